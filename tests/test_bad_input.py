"""Every stage, given bad input, stops with a clear error naming file, line and field (exit status 2, no traceback)
before doing any work, and leaves the input exactly as it was.

The matrix: 7 entry points (curate, train_reward, rl_gen, rl_edit, bench critics, bench policy, reward score) x
the defects a hostile tester tries (a bad line in the middle, a missing image, a corrupt PNG, a field of the wrong
type, an image field of the wrong type, a NaN score, an empty file, a duplicate id, a model path that does not
exist). Each case writes a broken copy of a real miniature manifest next to the original (so its relative image
paths still resolve) and runs the stage's own entry point, common.run_stage, in this process.
"""

import json
import re
import shutil
from pathlib import Path

import pytest

import bench
import common
import curate
import reward
import rl_edit
import rl_gen
import train_reward
from common import read_jsonl


# What each stage reads: the manifest it is given (relative to the miniature data root), its fields that the defects
# break (None: the stage has no such field), and the command line (M: the manifest, D: a scratch folder, C: the critic
# base, X: a model path that does not exist in place of the stage's model).
STAGES = {
    "curate": dict(manifest="bench/edit_execution.jsonl", image="edited", text="instruction", score=None,
                   argv=lambda M, D, C, X: ["--judge", X or C, "--edit-candidates", M,
                                            "--out", f"{D}/out"]),
    # train_reward checks that every image is there up front, and decodes each when it trains on it (decoding the
    # release's ~740K SFT images first would take an hour): one step over all three records meets the corrupt one
    "train_reward": dict(manifest="sft/edit_train.jsonl", image="images", text="mode", score="score",
                         argv=lambda M, D, C, X: ["--model", X or C, "--train-file", M, "--out", f"{D}/out",
                                                  "--max-steps", "1", "--global-batch", "3", "--micro-batch", "3"]),
    "rl_gen": dict(manifest="rl/gen_train.jsonl", image=None, text="prompt", score=None,
                   argv=lambda M, D, C, X: ["--model", f"{D}/no-generator", "--prompts", M, "--reward", "qma",
                                            "--reward-model", X or C, "--out", f"{D}/out"]),
    "rl_edit": dict(manifest="rl/edit_train.jsonl", image="image", text="prompt", score=None,
                    argv=lambda M, D, C, X: ["--model", f"{D}/no-editor", "--prompts", M, "--reward", "cme",
                                             "--reward-model", X or C, "--out", f"{D}/out"]),
    "bench critics": dict(manifest="bench/edit_execution.jsonl", image="source", text="instruction", score="human_score",
                          argv=lambda M, D, C, X: ["critics", "--bench-dir", str(Path(M).parent), "--out", f"{D}/out",
                                                   "--critic", f"base={X or C}"]),
    "bench policy": dict(manifest="rl/edit_test.jsonl", image="image", text="prompt", score=None,
                         argv=lambda M, D, C, X: ["policy", "--kind", "edit", "--base", X or f"{D}/no-editor", "--prompts",
                                                  M, "--tuned", f"t={D}/tuned", "--judge", "toy.judges:pixel",
                                                  "--out", f"{D}/out"]),
    "reward score": dict(manifest="bench/edit_execution.jsonl", image="source", text="instruction", score="human_score",
                         argv=lambda M, D, C, X: ["score", "--model", X or C, "--input", M, "--out", f"{D}/out.jsonl"]),
}
MAIN = {"curate": lambda a: curate.main(curate.get_args(a)), "train_reward": lambda a: train_reward.main(train_reward.get_args(a)),
        "rl_gen": lambda a: rl_gen.main(rl_gen.get_args(a)), "rl_edit": lambda a: rl_edit.main(rl_edit.get_args(a)),
        "bench critics": bench.main, "bench policy": bench.main, "reward score": reward.main}

# defect -> (what it does to the second record, what the error must say after "<file>:2")
DEFECTS = {
    "bad line": (None, r":2: not valid JSON"),
    "missing image": ("image", r":2: field '{image}'.*image .*nope\.png not found"),
    "corrupt png": ("image", r":2: field '{image}'.*image .*corrupt\.png cannot be read"),
    "text of the wrong type": ("text", r":2: field '{text}' must be"),
    "image of the wrong type": ("image", r":2: field '{image}' must be"),
    "nan score": ("score", r":2: field '{score}'"),
    "duplicate id": (None, r":2: field 'id'.*: duplicate"),
}


def break_record(row, defect, stage, first):
    f = STAGES[stage]
    image, text, score = f["image"], f["text"], f["score"]
    if defect == "missing image":
        row[image] = row[image][:-1] + ["images/nope.png"] if image == "images" else "images/nope.png"
    elif defect == "corrupt png":
        row[image] = row[image][:-1] + ["corrupt.png"] if image == "images" else "corrupt.png"
    elif defect == "text of the wrong type":
        row[text] = 5
    elif defect == "image of the wrong type":
        row[image] = 5
    elif defect == "nan score":
        row[score] = float("nan")
    elif defect == "duplicate id":
        row["id"] = first["id"]
    return row


def run(stage, argv, capsys):
    """The stage's command line through its entry point: (exit status, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        common.run_stage(MAIN[stage], argv)
    return exit.value.code, capsys.readouterr().err


@pytest.fixture
def scratch(tmp_path):
    (tmp_path / "tuned").mkdir()
    (tmp_path / "tuned" / "pytorch_lora_weights.safetensors").write_bytes(b"")  # bench policy checks it exists
    return tmp_path


def cases():
    for stage in STAGES:
        for defect, (field, _) in DEFECTS.items():
            if field is None or STAGES[stage][field] is not None:
                yield pytest.param(stage, defect, id=f"{stage}: {defect}")


@pytest.mark.parametrize("stage,defect", list(cases()))
def test_a_bad_manifest_stops_the_stage_naming_file_line_and_field(stage, defect, mini_data, critic_base, scratch, capsys):
    source = mini_data / STAGES[stage]["manifest"]
    folder = source.parent
    if stage == "bench critics":  # the bench is a folder of fixed file names: a copy of it, images included
        folder = scratch / "bench"
        shutil.copytree(source.parent, folder)
        source = folder / source.name
    rows = read_jsonl(source)[:3]
    name = f"bad-{stage.replace(' ', '-')}-{defect.replace(' ', '-')}.jsonl"
    manifest = source if stage == "bench critics" else folder / name
    png = next(mini_data.rglob("*.png"))
    (folder / "corrupt.png").write_bytes(png.read_bytes()[:len(png.read_bytes()) // 2])  # a PNG cut in half
    lines = [json.dumps(rows[0]), json.dumps(break_record(dict(rows[1]), defect, stage, rows[0])), json.dumps(rows[2])]
    if defect == "bad line":
        lines[1] = '{"id": "x", "prompt": '
    manifest.write_text("\n".join(lines) + "\n")
    before = manifest.read_bytes()
    try:
        code, err = run(stage, STAGES[stage]["argv"](str(manifest), scratch, str(critic_base), None), capsys)
        pattern = DEFECTS[defect][1].format(**{k: STAGES[stage][k] for k in ("image", "text", "score")})
        assert code == 2 and "Traceback" not in err
        assert re.search(re.escape(manifest.name) + pattern, err), err
        assert manifest.read_bytes() == before  # nothing rewritten, nothing shortened
        assert not (scratch / "out" / "metrics.jsonl").exists() and not (scratch / "out.jsonl").exists()  # no work done
    finally:
        if manifest != source:
            manifest.unlink()
        (folder / "corrupt.png").unlink()


@pytest.mark.parametrize("stage", list(STAGES))
def test_an_empty_manifest_stops_the_stage(stage, mini_data, critic_base, scratch, capsys):
    source = mini_data / STAGES[stage]["manifest"]
    folder = scratch / "bench" if stage == "bench critics" else source.parent
    if stage == "bench critics":
        shutil.copytree(source.parent, folder)
    manifest = folder / (source.name if stage == "bench critics" else f"empty-{stage.replace(' ', '-')}.jsonl")
    manifest.write_text("")
    try:
        code, err = run(stage, STAGES[stage]["argv"](str(manifest), scratch, str(critic_base), None), capsys)
        assert code == 2 and "Traceback" not in err and manifest.name in err
        assert "no records" in err or "no item" in err, err
    finally:
        if stage != "bench critics":
            manifest.unlink()


@pytest.mark.parametrize("stage", [s for s in STAGES if s != "bench policy"])
def test_a_model_path_that_does_not_exist_is_named(stage, mini_data, critic_base, scratch, capsys):
    """Not the hub's "Repo id must be in the form ...", and not a skipped row: the flag, the path, non-zero."""
    manifest = mini_data / STAGES[stage]["manifest"]
    code, err = run(stage, STAGES[stage]["argv"](str(manifest), scratch, str(critic_base), "/nonexistent/model"), capsys)
    assert code == 2 and "Traceback" not in err and "Repo id" not in err
    assert "/nonexistent/model" in err and "no such directory" in err or "not found" in err, err


def test_bench_policy_names_a_base_policy_that_does_not_exist(mini_data, scratch, capsys):
    argv = STAGES["bench policy"]["argv"](str(mini_data / "rl/edit_test.jsonl"), scratch, None, "/nonexistent/editor")
    code, err = run("bench policy", argv + ["--limit", "1"], capsys)
    assert code == 2 and "/nonexistent/editor" in err and "Traceback" not in err


# the flag that hands each stage's critic (curate: its judge and its SFT records) the scoring templates (reward.load_prompts)
PROMPT_FLAG = {"curate": "--prompt-file", "rl_gen": "--reward-prompt-file", "rl_edit": "--reward-prompt-file",
               "bench critics": "--prompt-file", "bench policy": "--prompt-file", "reward score": "--prompt-file"}


@pytest.mark.parametrize("stage", list(PROMPT_FLAG))
def test_a_broken_template_file_stops_every_stage_that_opens_a_critic(stage, mini_data, critic_base, scratch, capsys):
    """The templates reach the critic the stage opens, and are checked before any work: a field the templates do not
    have ({score}) stops the stage with the file's name."""
    templates = scratch / "templates.json"
    templates.write_text(json.dumps({"execution": "Rate {instruction} as {score}", "instruction": "{prompt}"}))
    argv = STAGES[stage]["argv"](str(mini_data / STAGES[stage]["manifest"]), scratch, str(critic_base), None)
    if stage == "bench policy":  # its judge here is the world's (a factory, which takes no templates): add a critic
        argv += ["--critic", f"c={critic_base}"]
    code, err = run(stage, argv + [PROMPT_FLAG[stage], str(templates)], capsys)
    assert code == 2 and "Traceback" not in err
    assert "templates.json: template 'execution' is not a str.format template" in err, err
