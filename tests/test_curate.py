"""curate.py: the on-disk contract, score balancing, resume, bad input, and the judge backends."""

import json
import random

import pytest

import curate
import toy
from common import DataError, load_image, read_jsonl, read_jsonl_resumable

WORLD = ["--edit-train", "60", "--gen-train", "40", "--bench-exec", "10", "--bench-cons", "10", "--bench-gen", "10",
         "--rl-train", "4", "--rl-test", "2"]


def world_and_curate_args(data, *flags):
    """The miniature world's candidates in `data` (python -m toy world), and curate.py's arguments for them."""
    if not (data / "world.json").exists():
        toy.main(["world", "--out", str(data)] + WORLD)
    return curate.get_args(["--preset", "mini", "--out", str(data), "--edit-candidates", str(data / "edit/candidates.jsonl"),
                            "--gen-candidates", str(data / "gen/candidates.jsonl"), *flags])


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


def test_curated_records_keep_the_report_and_plan_the_critic_does_not_see(mini_data):
    edit = read_jsonl(mini_data / "edit/curated.jsonl")[0]
    assert edit["context"].startswith("Obvious changes:") and "Position/layout:" in edit["context"]
    gen = read_jsonl(mini_data / "gen/curated.jsonl")[0]
    assert gen["context"].startswith("Analysis plan:")
    direct = read_jsonl(mini_data / "edit/curated_direct.jsonl")[0]
    assert direct["context"] is None


def test_resume_after_interruption_gives_the_same_records(tmp_path):
    data = tmp_path / "data"
    full = world_and_curate_args(data, "--ablation-direct", "0", "--out", str(tmp_path / "full"))
    curate.main(full)
    part = world_and_curate_args(data, "--ablation-direct", "0", "--out", str(tmp_path / "part"), "--max-items", "37")
    curate.main(part)
    part = tmp_path / "part"
    assert len(read_jsonl(part / "edit/curated.jsonl")) == 37 and not (part / "sft").exists()
    with open(part / "edit/curated.jsonl", "a") as f:
        f.write('{"id": "edit-train-0000')  # killed mid-write: a torn last line
    curate.main(world_and_curate_args(data, "--ablation-direct", "0", "--out", str(part)))
    for rel in ["edit/curated.jsonl", "gen/curated.jsonl", "sft/edit_train.jsonl", "sft/gen_val.jsonl"]:
        assert (part / rel).read_text() == (tmp_path / "full" / rel).read_text(), rel


def test_malformed_manifest_line_names_file_and_line(tmp_path):
    p = tmp_path / "cands.jsonl"
    p.write_text('{"id": "a", "source": "s.png", "edited": "e.png", "instruction": "x"}\n{not json\n')
    with pytest.raises(DataError, match=r"cands.jsonl:2: not valid JSON"):
        curate.read_candidates(p, "edit")
    p.write_text('{"id": "a", "source": "s.png", "instruction": "x"}\n')
    with pytest.raises(DataError, match=r"cands.jsonl:1: missing field 'edited'"):
        curate.read_candidates(p, "edit")


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
        self.calls, self.prompts = [], None

    def backend(self, args, prompts):
        """curate.make_backend's stand-in: this judge, asked with the run's templates."""
        self.prompts = prompts
        return self

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
    monkeypatch.setattr(curate, "make_backend", judge.backend)
    out = tmp_path / "out"
    curate.main(curate.get_args(["--judge", "scripted", "--edit-candidates", str(cands), "--out", str(out),
                                 "--balance-share", "0", "--ablation-direct", "0"]))
    rows = read_jsonl(out / "edit/curated.jsonl")
    assert [r["scores"] for r in rows] == [{"execution": 4, "consistency": 5}] * 2
    sft = read_jsonl(out / "sft/edit_train.jsonl") + read_jsonl(out / "sft/edit_val.jsonl")
    assert len(sft) == 4
    for r in sft:
        for p in r["images"]:
            load_image(p, out / "sft")  # paths relative to the SFT file reach the candidates' images
    # the evaluator saw the difference report; the critic's SFT prompt will not
    assert any("Difference report:\nthe circle is now blue" in c for c in judge.calls)


def test_a_template_file_reaches_the_judge_and_the_sft_records(tmp_path, monkeypatch):
    """--prompt-file: the judge is asked with the given templates and the SFT records carry them, so the critic trained
    on them turns an item into the same user turn when it is scored with the same file; modes the file leaves out keep
    reward.PROMPTS."""
    import reward
    cands, judge = write_candidates(tmp_path), ScriptedJudge()
    templates = tmp_path / "templates.json"
    templates.write_text(json.dumps({"execution": "<image><image>Edit: {instruction}\nEXECUTION 1-5?"}))
    monkeypatch.setattr(curate, "make_backend", judge.backend)
    out = tmp_path / "out"
    curate.main(curate.get_args(["--judge", "scripted", "--edit-candidates", str(cands), "--out", str(out),
                                 "--balance-share", "0", "--ablation-direct", "0", "--prompt-file", str(templates)]))
    assert sum(c.startswith("<image><image>Edit: ") for c in judge.calls) == 2  # one execution question per item
    sft = {r["id"]: r for r in read_jsonl(out / "sft/edit_train.jsonl") + read_jsonl(out / "sft/edit_val.jsonl")}
    rows = read_jsonl(cands)
    assert sft["c0:execution"]["messages"][0]["content"] == f"<image><image>Edit: {rows[0]['instruction']}\nEXECUTION 1-5?"
    assert sft["c0:consistency"]["messages"][0]["content"] == reward.build_prompt("consistency", rows[0]["instruction"])
    scored = reward.critic_messages("execution", rows[0]["instruction"], prompts=reward.load_prompts(templates))
    assert scored[0]["content"] == reward.content_parts(sft["c0:execution"]["messages"][0]["content"])


def test_a_gen_candidate_s_requirement_reaches_the_judge_and_its_record_as_the_critic_will_be_asked(tmp_path):
    """A gen candidate's optional requirement is part of the instruction question, in the judge's question and in
    the SFT record, exactly as reward.check_items puts it in the critic's question at scoring time."""
    from PIL import Image
    import reward
    Image.new("RGB", (8, 8), "red").save(tmp_path / "g.png")
    item = {"image": "g.png", "prompt": "A red cat.", "requirement": "The cat is on the left.", "_root": tmp_path}

    class Judge:
        asked = []

        def chat(self, images, text, max_new_tokens):
            self.asked.append(text)
            return "\\boxed{4}"
    curate.ChatBackend(Judge(), 16, reward.PROMPTS).gen(item)
    assert sum("Requirement: The cat is on the left." in t for t in Judge.asked) == 1  # the instruction question only
    row = dict(item, id="g0", scores={"instruction": 4, "quality": [5, 5, 5]}, answers={"instruction": "a", "quality": "b"})
    record = curate.sft_records([row], "gen", "", reward.PROMPTS)[0]
    critic_turn = reward.check_items("instruction", [dict(item, image=Image.open(tmp_path / "g.png"))])[0]
    assert record["mode"] == "instruction" and reward.content_parts(record["messages"][0]["content"]) == critic_turn


def test_a_model_judge_gets_the_images_where_the_scoring_prompt_marks_them(tmp_path):
    from PIL import Image
    import reward
    a, b = Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")
    a.save(tmp_path / "a.png"), b.save(tmp_path / "b.png")
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
    item = {"source": "a.png", "edited": "b.png", "instruction": "Make it blue.", "_root": tmp_path}
    report, answers = curate.ChatBackend(Judge(), 16, reward.PROMPTS).edit(item)
    assert [n for n, _ in Judge.asked] == [2, 2, 2, 2] and Judge.asked[0][1] == curate.DIFF_PROMPTS[0]
    assert set(answers) == {"execution", "consistency"} and "Difference report" in Judge.asked[2][1]


def test_balancing_adds_a_share_of_candidates_again_with_another_records_instruction():
    items = [{"id": f"c{i}", "source": "s.png", "edited": "e.png", "instruction": f"Do {i}."} for i in range(10)]
    out = curate.balance([dict(it) for it in items], 0.3, seed=0)
    added = out[10:]
    assert out[:10] == items and len(added) == 3
    for b in added:
        original = next(it for it in items if it["id"] + ":balanced" == b["id"])
        assert b["balanced"] and b["instruction"] != original["instruction"] and b["edited"] == original["edited"]
    with pytest.raises(DataError, match="no candidate has another instruction"):
        curate.balance([dict(it, instruction="Same.") for it in items], 0.3, seed=0)


def test_the_world_s_teacher_curates_through_the_judge_seam(tmp_path):
    """--judge toy.oracle:teacher: a factory whose object runs the pipelines; its answers are those of the world's
    OracleJudge (noise 0.15), parsed like a model's."""
    args = world_and_curate_args(tmp_path / "data", "--ablation-direct", "0")
    curate.main(args)
    rows = read_jsonl(tmp_path / "data/edit/curated.jsonl")
    judge = toy.OracleJudge(0.15, "report")
    for r in rows[:10]:
        t = r["toy"]
        want = judge.judge_edit(r["id"], toy.Scene.from_dict(t["scene"]), toy.Scene.from_dict(t["out_scene"]), t["edit"])
        assert r["answers"] == {m: a[0] for m, a in want.items()} and r["scores"] == {m: a[1] for m, a in want.items()}
    assert any(r["toy"].get("balanced") for r in rows) and not any(r["id"].endswith(":balanced") for r in rows)


def test_a_judge_that_neither_curates_nor_chats_is_refused(tmp_path):
    args = world_and_curate_args(tmp_path / "data", "--judge", "toy.judges:pixel")
    with pytest.raises(DataError, match="neither runs the pipelines"):
        curate.main(args)


def test_curate_does_not_import_the_miniature_world():
    import subprocess
    import sys
    code = "import sys, curate; print(sorted(m for m in sys.modules if m == 'toy' or m.startswith('toy.')))"
    run = subprocess.run([sys.executable, "-c", code], cwd=str(curate.__file__).rsplit("/", 1)[0], capture_output=True,
                         text=True, check=True)
    assert run.stdout.strip() == "[]"
