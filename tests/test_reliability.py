"""Nothing lost, nothing half-written: resumable JSONL, directories written whole, checkpoint swaps that survive a
kill at any moment, inputs checked before a judge is paid, image paths that leave their dataset counted."""

import json
import os

import pytest

import common
import curate
import reward
from common import DataError, read_jsonl_resumable, recover_dir, replace_dir


# -----------------------------------------------------------------------------
# resumable JSONL: only a torn last line may go


def test_a_torn_last_line_is_dropped_and_reported(tmp_path, capsys):
    f = tmp_path / "curated.jsonl"
    f.write_text('{"id": 1}\n{"id": 2}\n{"id": 3, "answ')  # killed in the middle of append_jsonl
    assert read_jsonl_resumable(f) == [{"id": 1}, {"id": 2}]
    assert f.read_text() == '{"id": 1}\n{"id": 2}\n' and "dropped a torn last line" in capsys.readouterr().out


def test_a_bad_line_in_the_middle_is_an_error_and_the_file_is_left_as_it_is(tmp_path):
    f = tmp_path / "curated.jsonl"
    f.write_text("".join(json.dumps({"id": i}) + "\n" for i in range(4)) + "{broken\n" +
                 "".join(json.dumps({"id": i}) + "\n" for i in range(5, 3000)))
    before = f.read_bytes()
    with pytest.raises(DataError, match=r"curated.jsonl:5: not valid JSON; the file is left as it is"):
        read_jsonl_resumable(f)
    assert f.read_bytes() == before  # 2999 judged rows kept, not cut to 4
    f.write_text('{"id": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"curated.jsonl:2: expected a JSON object"):
        read_jsonl_resumable(f)


def test_a_complete_last_record_without_its_newline_is_kept_and_the_next_append_starts_a_line(tmp_path):
    f = tmp_path / "scores.jsonl"
    f.write_text('{"id": 1}\n{"id": 2}')
    assert read_jsonl_resumable(f) == [{"id": 1}, {"id": 2}]
    common.append_jsonl(f, {"id": 3})
    assert read_jsonl_resumable(f) == [{"id": 1}, {"id": 2}, {"id": 3}]


def test_reward_score_refuses_to_resume_over_a_damaged_output(mini_data, critic_base, tmp_path, capsys):
    out = tmp_path / "judgements.jsonl"
    out.write_text('{"id": "a", "mode": "execution"}\n{oops\n{"id": "b", "mode": "execution"}\n')
    before = out.read_bytes()
    with pytest.raises(SystemExit):
        common.run_stage(reward.main, ["score", "--model", str(critic_base), "--input",
                                       str(mini_data / "bench" / "edit_execution.jsonl"), "--out", str(out)])
    assert "judgements.jsonl:2: not valid JSON" in capsys.readouterr().err and out.read_bytes() == before


# -----------------------------------------------------------------------------
# directories written whole


def test_a_critic_base_killed_while_being_built_is_built_again(tmp_path, monkeypatch):
    import argparse
    from toy import data as world_data
    root, calls = tmp_path / "data", []
    (root / "sft").mkdir(parents=True)

    def build(out, texts, **kw):  # writes config.json first, as save_pretrained does, then is killed
        calls.append(out)
        os.makedirs(out, exist_ok=True)
        (out / "config.json").write_text("{")
        if len(calls) == 1:
            raise KeyboardInterrupt
        (out / "config.json").write_text("{}")
        return 1

    monkeypatch.setattr(world_data, "build_tiny_critic", build)
    monkeypatch.setattr(world_data, "write_vlm", lambda root, seed: None)  # the seeing-stage records: not under test
    ap = argparse.ArgumentParser()
    world_data.critic_base_args(ap)
    final = tmp_path / "models" / "critic-base"
    args = ap.parse_args(["--data", str(root), "--out", str(final), "--vision-steps", "0"])
    with pytest.raises(KeyboardInterrupt):
        world_data.build_critic_base(args)
    assert not final.exists()  # the broken build is not taken for a finished one ...
    world_data.build_critic_base(args)
    assert len(calls) == 2  # ... the rerun builds it again
    assert (final / "config.json").read_text() == "{}" and not final.with_name("critic-base.tmp").exists()


def checkpoint(path, step):
    path.mkdir(parents=True)
    (path / "weights.bin").write_text(f"weights of step {step}")
    (path / "state.json").write_text(json.dumps({"step": step}))  # written last: marks it complete
    return path


@pytest.mark.parametrize("killed", ["after final -> final.old", "after tmp -> final", "before anything", "while writing tmp"])
def test_a_kill_anywhere_in_a_checkpoint_swap_leaves_the_newest_complete_copy(tmp_path, killed):
    final, tmp = tmp_path / "checkpoint", tmp_path / "checkpoint.tmp"
    checkpoint(final, 1)
    checkpoint(tmp, 2)
    if killed == "after final -> final.old":  # the window the old code had: only checkpoint.old and .tmp are left
        os.replace(final, tmp_path / "checkpoint.old")
    elif killed == "after tmp -> final":
        os.replace(final, tmp_path / "checkpoint.old")
        os.replace(tmp, final)
    elif killed == "while writing tmp":
        (tmp / "state.json").unlink()
    expected = 1 if killed == "while writing tmp" else 2
    assert recover_dir(final, "state.json") == final
    assert json.loads((final / "state.json").read_text())["step"] == expected
    assert (final / "weights.bin").read_text() == f"weights of step {expected}"


def test_replace_dir_swaps_a_complete_directory_in(tmp_path):
    final = checkpoint(tmp_path / "checkpoint", 1)
    replace_dir(checkpoint(tmp_path / "checkpoint.tmp", 2), final)
    assert json.loads((final / "state.json").read_text())["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_rl_resume_finds_a_checkpoint_left_between_the_two_renames(tmp_path):
    common.setup_dist()
    checkpoint(tmp_path / "checkpoint.old", 3)
    assert common.find_checkpoint(tmp_path, rank=0) == tmp_path / "checkpoint"
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["step"] == 3
    assert common.find_checkpoint(tmp_path / "elsewhere", rank=0) is None


# -----------------------------------------------------------------------------
# inputs checked before a judge is paid; image paths that leave the dataset


def test_curate_checks_every_image_before_it_judges_anything(mini_data, tmp_path, monkeypatch):
    bench = mini_data / "bench"
    rows = [json.loads(line) for line in (bench / "edit_execution.jsonl").read_text().splitlines()[:5]]
    (bench / "corrupt-last.png").write_bytes((bench / rows[0]["edited"]).read_bytes()[:40])
    rows[-1]["edited"] = "corrupt-last.png"
    cands = bench / "cands-corrupt-last.jsonl"
    cands.write_text("".join(json.dumps(r) + "\n" for r in rows))
    judged = []

    class Judge(curate.ChatBackend):
        def chat(self, images, text):
            judged.append(text)
            return '{"score": [3]}'

    monkeypatch.setattr(curate, "make_backend", lambda args, prompts: Judge())
    try:
        with pytest.raises(DataError, match=r"cands-corrupt-last.jsonl:5: field 'edited': image .*corrupt-last.png cannot be read"):
            curate.main(curate.get_args(["--judge", "unused", "--edit-candidates", str(cands), "--out", str(tmp_path / "out")]))
    finally:
        cands.unlink()
        (bench / "corrupt-last.png").unlink()
    assert judged == [] and not (tmp_path / "out" / "edit").exists()  # nothing judged, nothing paid for


def test_image_paths_leading_outside_the_dataset_are_counted_and_printed(tmp_path, capsys):
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    for d in (data / "images", elsewhere):
        d.mkdir(parents=True)
    for p in (data / "images" / "a.png", elsewhere / "b.png", elsewhere / "c.png"):
        p.write_bytes(b"png")
    manifest = data / "m.jsonl"
    manifest.write_text("".join(json.dumps({"id": i, "image": p}) + "\n" for i, p in
                                enumerate(["images/a.png", "../elsewhere/b.png", str(elsewhere / "c.png"),
                                           "images/../images/a.png"])))
    rows = common.read_manifest(manifest, {"id": "id", "image": "image"})
    assert len(rows) == 4  # allowed (shared image stores are common) ...
    out = capsys.readouterr().out  # ... but counted and named
    assert f"{manifest}: 2 image path(s) lead outside {data}" in out and "../elsewhere/b.png" in out
