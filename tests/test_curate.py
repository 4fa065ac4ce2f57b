"""curate.py: the on-disk contract, score balancing, resume, bad input, and the model-judge backend."""

import json
import random

import pytest

import curate
import toy
from common import DataError, load_image, read_jsonl, read_jsonl_resumable

SMALL = ["--edit-train", "60", "--gen-train", "40", "--bench-exec", "10", "--bench-cons", "10", "--bench-gen", "10",
         "--rl-train", "4", "--rl-test", "2", "--critic-vision-steps", "2"]


def test_cli_writes_every_split_of_the_contract(mini_data):
    for rel in ["sft/edit_train.jsonl", "sft/edit_val.jsonl", "sft/gen_train.jsonl", "sft/gen_val.jsonl",
                "sft/edit_direct_train.jsonl", "sft/gen_direct_train.jsonl", "bench/edit_execution.jsonl",
                "bench/edit_consistency.jsonl", "bench/gen.jsonl", "rl/edit_train.jsonl", "rl/edit_test.jsonl",
                "rl/gen_train.jsonl", "rl/gen_test.jsonl", "summary.json"]:
        assert (mini_data / rel).is_file(), rel
    rec = read_jsonl(mini_data / "sft/edit_train.jsonl", required=("id", "messages", "images", "mode", "score"))[0]
    user, answer = rec["messages"]
    assert user["content"].count("<image>") == 2 and "Difference report" not in user["content"]
    assert rec["images"][0].endswith("_src.png") and rec["images"][1].endswith("_out.png")  # original first
    for p in rec["images"]:
        load_image(p, mini_data / "sft")  # relative to the manifest's directory
    assert json.loads(answer["content"])["score"] == [rec["score"]]
    gen = read_jsonl(mini_data / "sft/gen_train.jsonl")
    assert any("\\boxed{" in r["messages"][1]["content"] for r in gen)
    assert not any("Analysis plan" in r["messages"][0]["content"] for r in gen)


def test_vlm_pretraining_records_describe_the_ground_truth_and_hold_out_the_sft_val_candidates(mini_data):
    train, val = read_jsonl(mini_data / "sft/vlm_train.jsonl"), read_jsonl(mini_data / "sft/vlm_val.jsonl")
    curated = {r["id"]: r for kind in ("edit", "gen") for r in read_jsonl(mini_data / kind / "curated.jsonl")}
    tags = {r["id"].rsplit(":", 1)[1] for r in train}
    assert {"describe", "changes", "asked"} <= tags and tags & {"where", "is-there"}
    for r in train + val:
        cand = curated[r["id"].rsplit(":", 1)[0]]
        q, a = r["messages"][0]["content"], r["messages"][1]["content"]
        assert q.count("<image>") == len(r["images"]) and not q.startswith("<image>")  # the question comes first
        q = q.replace("\n<image>", "").replace("<image>", "") if "Instruction:" not in q else q
        for p in r["images"]:
            load_image(p, mini_data / "sft")
        before, after = (toy.Scene.from_dict(cand["toy"].get("scene")), toy.Scene.from_dict(cand["toy"]["out_scene"]))
        if q == "Describe the image.":
            assert a == toy.describe(after) + "."
        elif q == "Describe both images.":
            assert a == f"Image 1: {toy.describe(before)}. Image 2: {toy.describe(after)}."
        elif q == "What changed from image 1 to image 2?":
            changes = toy.scene_changes(before, after)
            assert a == ("; ".join(toy.change_phrase(before, after, c) for c in changes) if changes else "nothing") + "."
        elif q.endswith("What is asked?"):
            assert q == f"Instruction: {cand['instruction']}\n<image><image>What is asked?"
            assert a == toy.request_summary(before, cand["toy"]["edit"]) + "."
        else:
            assert q.startswith(("Where is the ", "Is there a ")) and a in ("Yes.", "No.") or a.startswith("At the ")
    # the same candidates are held out as in the critics' SFT split (no val image is seen in pre-training)
    key = lambda r: r["id"].rsplit(":", 1)[0]
    sft_val = {key(r) for kind in ("edit", "gen") for r in read_jsonl(mini_data / f"sft/{kind}_val.jsonl")}
    assert {key(r) for r in val} == sft_val
    assert not {key(r) for r in train} & sft_val


def test_curated_records_keep_the_report_and_plan_the_critic_does_not_see(mini_data):
    edit = read_jsonl(mini_data / "edit/curated.jsonl")[0]
    assert edit["context"].startswith("Obvious changes:") and "Position/layout:" in edit["context"]
    gen = read_jsonl(mini_data / "gen/curated.jsonl")[0]
    assert gen["context"].startswith("Analysis plan:")
    direct = read_jsonl(mini_data / "edit/curated_direct.jsonl")[0]
    assert direct["context"] is None


def test_bench_is_labelled_with_ground_truth_and_disjoint_from_training(mini_data):
    train = {json.dumps(r["toy"], sort_keys=True) for r in read_jsonl(mini_data / "edit/curated.jsonl")}
    for name, fn in [("edit_execution", toy.execution_score), ("edit_consistency", toy.consistency_score)]:
        for r in read_jsonl(mini_data / f"bench/{name}.jsonl", required=("id", "source", "edited", "instruction", "human_score")):
            t = r["toy"]
            assert r["human_score"] == fn(toy.Scene.from_dict(t["scene"]), toy.Scene.from_dict(t["out_scene"]), t["edit"])
            assert json.dumps(t, sort_keys=True) not in train
    gen = read_jsonl(mini_data / "bench/gen.jsonl", required=("id", "image", "prompt", "human_score", "difficulty"))
    assert {r["difficulty"] for r in gen} <= {"easy", "hard"}


def test_score_balancing_produces_low_execution_scores():
    args = curate.get_args(["--balance-share", "1.0"])
    scores = []
    for i in range(100):
        item, src, out, _ = curate.toy_edit_candidate("train", i, args)
        assert item["toy"]["balanced"]
        scores.append(toy.execution_score(src, out, item["toy"]["edit"]))
    assert sum(s <= 2 for s in scores) / len(scores) > 0.7


def test_resume_after_interruption_gives_the_same_records(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    curate.main(curate.get_args(["--out", str(full), "--ablation-direct", "0"] + SMALL))
    curate.main(curate.get_args(["--out", str(part), "--ablation-direct", "0", "--max-items", "37"] + SMALL))
    assert len(read_jsonl(part / "edit/curated.jsonl")) == 37 and not (part / "sft").exists()
    with open(part / "edit/curated.jsonl", "a") as f:
        f.write('{"id": "edit-train-0000')  # killed mid-write: a torn last line
    curate.main(curate.get_args(["--out", str(part), "--ablation-direct", "0"] + SMALL))
    for rel in ["edit/curated.jsonl", "gen/curated.jsonl", "sft/edit_train.jsonl", "sft/gen_val.jsonl", "bench/gen.jsonl"]:
        assert (part / rel).read_text() == (full / rel).read_text(), rel


def test_malformed_manifest_line_names_file_and_line(tmp_path):
    p = tmp_path / "cands.jsonl"
    p.write_text('{"id": "a", "source": "s.png", "edited": "e.png", "instruction": "x"}\n{not json\n')
    with pytest.raises(DataError, match=r"cands.jsonl:2: not valid JSON"):
        curate.real_candidates(p, "edit")
    p.write_text('{"id": "a", "source": "s.png", "instruction": "x"}\n')
    with pytest.raises(DataError, match=r"cands.jsonl:1: missing field 'edited'"):
        curate.real_candidates(p, "edit")


def test_missing_and_corrupt_images_name_the_file(tmp_path):
    with pytest.raises(DataError, match=r"nope.png not found"):
        load_image("nope.png", tmp_path)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    with pytest.raises(DataError, match=r"bad.png cannot be read"):
        load_image(tmp_path / "bad.png")


def test_torn_last_line_is_dropped_on_resume(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"id": 1}\n{"id": 2}\n{"id": ')
    assert [r["id"] for r in read_jsonl_resumable(p)] == [1, 2]
    assert p.read_text() == '{"id": 1}\n{"id": 2}\n'


def write_candidates(tmp_path, n=2):
    rng = random.Random(0)
    rows = []
    for i in range(n):
        src = toy.random_scene(rng)
        edit = toy.random_edit(rng, src)
        toy.render(src, 64).save(tmp_path / f"{i}_src.png")
        toy.render(toy.apply_edit(src, edit), 64).save(tmp_path / f"{i}_out.png")
        rows.append({"id": f"c{i}", "source": f"{i}_src.png", "edited": f"{i}_out.png", "instruction": toy.instruction(src, edit)})
    (tmp_path / "cands.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / "cands.jsonl"


def test_a_model_judge_s_garbage_is_counted_as_unparseable(tmp_path, critic_base, capsys):
    """The untrained tiny critic answers garbage: every item is counted and logged, none is scored."""
    cands = write_candidates(tmp_path)
    out = tmp_path / "out"
    curate.main(curate.get_args(["--judge", str(critic_base), "--edit-candidates",
                                 str(cands), "--max-new-tokens", "6", "--balance-share", "0", "--ablation-direct", "0",
                                 "--out", str(out)]))
    assert "judged 2 items, 2 unparseable" in capsys.readouterr().out
    assert not (out / "edit/curated.jsonl").exists()
    failures = read_jsonl(out / "edit/curated_failures.jsonl")
    assert {f["id"] for f in failures} == {"c0", "c1"} and all(f["errors"] for f in failures)


def test_a_missing_candidate_image_stops_with_the_file_name(tmp_path, critic_base):
    cands = write_candidates(tmp_path, n=1)
    (tmp_path / "0_out.png").unlink()
    with pytest.raises(DataError, match=r"cands.jsonl:1: field 'edited': image .*0_out.png not found"):
        curate.main(curate.get_args(["--judge", str(critic_base), "--edit-candidates",
                                     str(cands), "--max-new-tokens", "4", "--balance-share", "0", "--out", str(tmp_path / "o")]))


def test_tiny_critic_base_reloads_with_the_auto_classes(critic_base):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    model = AutoModelForImageTextToText.from_pretrained(critic_base)
    proc = AutoProcessor.from_pretrained(critic_base)
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
    assert proc.tokenizer.chat_template is not None
    im = toy.render(toy.random_scene(random.Random(0)), 64)
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
                                    add_generation_prompt=True, tokenize=False)
    batch = proc(text=[text], images=[[im]], return_tensors="pt")
    assert int((batch["input_ids"] == model.config.image_token_id).sum()) == 16  # (64/8)^2 patches, merged 2x2


class ScriptedJudge(curate.ChatBackend):
    """A model judge whose answers are scripted: the real-data path end to end, without a model."""

    def __init__(self):
        self.calls = []

    def chat(self, images, text):
        self.calls.append(text)
        if "Describe" in text or "Compare" in text:
            return "the circle is now blue"
        if "EXECUTION" in text:
            return 'Looks right. {"reasoning": "done", "score": [4]}'
        return "Nothing else changed. Score: 5"  # no JSON: the lenient pattern parses it


def test_real_data_path_writes_sft_files_relative_to_their_directory(tmp_path, monkeypatch):
    cands = write_candidates(tmp_path)
    judge = ScriptedJudge()
    monkeypatch.setattr(curate, "make_backend", lambda args: judge)
    out = tmp_path / "out"
    curate.main(curate.get_args(["--edit-candidates", str(cands), "--out", str(out), "--balance-share", "0",
                                 "--ablation-direct", "0"]))
    rows = read_jsonl(out / "edit/curated.jsonl")
    assert [r["scores"] for r in rows] == [{"execution": 4, "consistency": 5}] * 2
    sft = read_jsonl(out / "sft/edit_train.jsonl") + read_jsonl(out / "sft/edit_val.jsonl")
    assert len(sft) == 4
    for r in sft:
        for p in r["images"]:
            load_image(p, out / "sft")  # paths relative to the SFT file reach the candidates' images
    # the evaluator saw the difference report; the critic's SFT prompt will not
    assert any("Difference report:\nthe circle is now blue" in c for c in judge.calls)


def test_a_model_judge_gets_the_images_where_the_scoring_prompt_marks_them():
    from PIL import Image
    import reward
    a, b = Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")
    turn = curate.build_prompt("execution", "Make it blue.")
    parts = reward.content_parts(reward.mark_images(turn, 2))
    kinds = [p["type"] for p in parts]
    assert kinds.index("image") > 0 and "Make it blue." in parts[0]["text"] and kinds.count("image") == 2
    assert [p["type"] for p in reward.content_parts(reward.mark_images("Describe.", 1))] == ["image", "text"]  # images first
    with pytest.raises(ValueError, match="2 image"):
        reward.mark_images("one <image> only", 2)
    sent = reward.api_content(parts, [a, b])  # what a served judge gets: the source first, as data URLs
    assert [p["type"] for p in sent] == ["text", "image_url", "image_url", "text"]
    assert sent[1]["image_url"]["url"].startswith("data:image/png;base64,") and sent[1] != sent[2]

    class Judge:  # the backend asks its judge: the difference report first, then each score
        asked = []

        def chat(self, images, text, max_new_tokens):
            self.asked.append((len(images), text))
            return '{"score": [4]}'
    report, answers = curate.ChatBackend(Judge(), 16).edit({"_source": a, "_edited": b, "instruction": "Make it blue."})
    assert [n for n, _ in Judge.asked] == [2, 2, 2, 2] and Judge.asked[0][1] == curate.DIFF_PROMPTS[0]
    assert set(answers) == {"execution", "consistency"} and "Difference report" in Judge.asked[2][1]


def test_world_images_are_the_same_in_every_process(tmp_path):
    """Degradation noise is seeded from the id, never from hash(), which Python salts per process."""
    import os
    import subprocess
    import sys
    code = ("import curate, sys, pathlib; a = curate.get_args([]); "
            "item, src, out, deg = curate.toy_edit_candidate('train', 0, a); deg = dict(deg or {}, noise=3); "
            "root = pathlib.Path(sys.argv[1]); (root / 'images').mkdir(parents=True); "
            "curate.write_toy_edit_images(root, item, src, out, deg, 64)")
    for k in (1, 2):
        run = subprocess.run([sys.executable, "-c", code, str(tmp_path / str(k))], cwd=os.path.dirname(curate.__file__),
                             capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": str(k)})
        assert run.returncode == 0, run.stderr
    a, b = (sorted((tmp_path / str(k) / "images").iterdir()) for k in (1, 2))
    assert [p.name for p in a] == [p.name for p in b] and all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))
    assert curate.noise_seed("edit-train-000007") == 2718243933  # crc32 of the id: the same on every machine
