"""The miniature world: rubric-to-score mapping on hand-built scenes, oracle texts that parse back, the judges as
critics, and the data the world makes."""

import copy
import json
import random

import pytest
from PIL import Image

import toy
import toy.data
import toy.world
from common import load_image, read_jsonl
from reward import parse_score
from toy import Obj, Scene


def two_objects():
    return Scene("white", [Obj(0, "circle", "red", "large", 0, 0), Obj(1, "square", "blue", "small", 2, 2)])


RECOLOR = {"op": "recolor", "target": 0, "color": "green"}


def test_unchanged_image_gets_execution_1_and_consistency_5():
    src = two_objects()
    assert toy.execution_score(src, copy.deepcopy(src), RECOLOR) == 1
    assert toy.consistency_score(src, copy.deepcopy(src), RECOLOR) == 5


def test_perfect_edit_gets_5_and_5():
    src = two_objects()
    out = toy.apply_edit(src, RECOLOR)
    assert out.get(0).color == "green" and src.get(0).color == "red"  # apply_edit does not mutate
    assert (toy.execution_score(src, out, RECOLOR), toy.consistency_score(src, out, RECOLOR)) == (5, 5)


def test_one_extra_significant_change_drops_consistency_to_4():
    src = two_objects()
    out = toy.apply_edit(src, RECOLOR)
    out.get(1).size = "large"
    assert toy.execution_score(src, out, RECOLOR) == 5  # execution ignores unrequested changes
    assert toy.consistency_score(src, out, RECOLOR) == 4


def test_consistency_levels_follow_the_counts_of_the_rubric():
    c = toy.consistency_from_counts
    assert [c(0, 0), c(1, 0), c(0, 2), c(1, 2), c(2, 0), c(3, 4), c(0, 3), c(4, 0), c(0, 5)] == [5, 4, 4, 4, 3, 3, 3, 2, 2]
    assert c(0, 0, different_image=True) == 1


def test_minor_changes_count_as_minor():
    src = two_objects()
    out = toy.apply_edit(src, RECOLOR)
    out.get(1).dx = toy.NUDGE  # a nudge and a tint: two minor changes -> 4
    out.get(1).tint = 1
    assert toy.consistency_score(src, out, RECOLOR) == 4
    out.background = "gray"  # plus one significant -> still 4 ("one significant and/or 1-2 minor")
    assert toy.consistency_score(src, out, RECOLOR) == 4
    out.get(1).color = "yellow"  # two significant -> 3
    assert toy.consistency_score(src, out, RECOLOR) == 3


def test_recolor_to_the_wrong_colour_is_3_and_tinted_right_colour_is_4():
    src = two_objects()
    wrong = toy.apply_edit(src, dict(RECOLOR, color="purple"))
    assert toy.execution_score(src, wrong, RECOLOR) == 3
    tinted = toy.apply_edit(src, RECOLOR)
    tinted.get(0).tint = 1
    assert toy.execution_score(src, tinted, RECOLOR) == 4


def test_edit_on_the_wrong_object_is_execution_2_and_costs_consistency():
    src = two_objects()
    out = toy.apply_edit(src, {"op": "recolor", "target": 1, "color": "green"})
    assert toy.execution_score(src, out, RECOLOR) == 2
    assert toy.consistency_score(src, out, RECOLOR) == 4


def test_attributes_of_a_replaced_entity_are_not_counted_against_consistency():
    src = two_objects()
    edit = {"op": "replace", "target": 0, "shape": "triangle", "color": "yellow"}
    out = toy.apply_edit(src, edit)
    out.get(0).size = "small"  # the replaced entity may differ in any attribute
    assert (toy.execution_score(src, out, edit), toy.consistency_score(src, out, edit)) == (5, 5)


def test_a_different_image_gets_consistency_1():
    src = two_objects()
    out = Scene("gray", [Obj(100, "triangle", "yellow", "small", 1, 1)])
    assert toy.consistency_score(src, out, RECOLOR) == 1


def test_move_scores_partial_progress():
    src = two_objects()
    edit = {"op": "move", "target": 1, "col": 0, "row": 2}
    out = toy.apply_edit(src, edit)
    assert toy.execution_score(src, out, edit) == 5
    out.get(1).col = 1  # one cell short of the target, but closer
    assert toy.execution_score(src, out, edit) == 4


def test_instruction_score_follows_the_checklist():
    want = two_objects()
    got = copy.deepcopy(want)
    assert toy.instruction_score(want, got) == 5
    got.background = "gray"
    assert toy.instruction_score(want, got) == 4  # one detail off
    got.get(0).size, got.get(1).row = "small", 0
    assert toy.instruction_score(want, got) == 3  # three details off
    got = copy.deepcopy(want)
    got.objects.pop()
    assert toy.instruction_score(want, got) == 3  # main subject present, one missing
    assert toy.instruction_score(want, Scene("white", [])) == 1  # irrelevant


def test_quality_scores_follow_the_degradation():
    assert toy.quality_scores(None) == [5, 5, 5]
    assert toy.quality_scores({"noise": 2, "blur": 4}) == [5, 3, 1]


def test_every_editor_yields_scores_in_range_and_perfect_is_5_5():
    rng = random.Random(0)
    for i in range(300):
        src = toy.random_scene(rng)
        edit = toy.random_edit(rng, src)
        for kind in toy.EDITORS:
            out, _ = toy.simulate_editor(rng, src, edit, kind)
            e, c = toy.execution_score(src, out, edit), toy.consistency_score(src, out, edit)
            assert 1 <= e <= 5 and 1 <= c <= 5
            if kind in ("perfect", "degraded"):
                assert (e, c) == (5, 5)
            if kind == "no_op":
                assert (e, c) == (1, 5)


def test_noiseless_oracle_texts_parse_back_to_its_scores():
    rng = random.Random(1)
    judge = toy.OracleJudge(noise=0.0)
    for i in range(100):
        src = toy.random_scene(rng)
        edit = toy.random_edit(rng, src)
        out, _ = toy.simulate_editor(rng, src, edit, rng.choice(toy.EDITORS))
        ans = judge.judge_edit(str(i), src, out, edit)
        assert parse_score(ans["execution"][0]).scores == [ans["execution"][1]] == [toy.execution_score(src, out, edit)]
        assert parse_score(ans["consistency"][0]).scores == [ans["consistency"][1]] == [toy.consistency_score(src, out, edit)]
        want = toy.random_scene(rng)
        got, deg = toy.simulate_generator(rng, want, rng.choice(toy.GENERATORS))
        g = judge.judge_gen(str(i), want, got, deg)
        assert parse_score(g["instruction"][0]).scores == [g["instruction"][1]] == [toy.instruction_score(want, got)]
        assert parse_score(g["quality"][0], 3).scores == g["quality"][1] == toy.quality_scores(deg)


def test_direct_judging_misses_more_than_report_first_judging():
    """The paper's argument, built into the teacher: without a difference report, more errors."""
    rng = random.Random(2)
    errors = {"report": 0, "direct": 0}
    for mode in errors:
        judge = toy.OracleJudge(noise=0.2, mode=mode)
        rng = random.Random(2)
        for i in range(400):
            src = toy.random_scene(rng)
            edit = toy.random_edit(rng, src)
            out, _ = toy.simulate_editor(rng, src, edit, rng.choice(toy.EDITORS))
            ans = judge.judge_edit(str(i), src, out, edit)
            errors[mode] += abs(ans["consistency"][1] - toy.consistency_score(src, out, edit))
            errors[mode] += abs(ans["execution"][1] - toy.execution_score(src, out, edit))
    assert errors["direct"] > 1.3 * errors["report"] > 0


def test_difference_report_names_the_change_in_each_pass():
    src = two_objects()
    out = toy.apply_edit(src, RECOLOR)
    out.get(1).dx = toy.NUDGE
    report = toy.OracleJudge().difference_report(src, out)
    assert "Obvious changes: red circle recolored green." in report
    assert "Position/layout: blue square shifted slightly." in report


def test_render_is_deterministic_and_sized():
    s = two_objects()
    a, b = toy.render(s, 64, {"noise": 2}, seed=3), toy.render(s, 64, {"noise": 2}, seed=3)
    assert a.size == (64, 64) and a.tobytes() == b.tobytes()


def test_pixel_judges_are_perfect_on_exact_renderings_and_low_on_wrong_ones():
    src = two_objects()
    target = toy.apply_edit(src, RECOLOR)
    assert toy.pixel_judge_edit(toy.render(target, 32), src, target)["overall"] == 1.0
    no_op = toy.pixel_judge_edit(toy.render(src, 32), src, target)
    assert no_op["kept"] == 1.0 and no_op["edited"] < 0.2
    assert toy.pixel_judge_gen(toy.render(src, 32), src)["overall"] == 1.0
    assert toy.pixel_judge_gen(toy.render(Scene("gray"), 32), src)["overall"] < 0.3


def python_side_by_side(code, runs):
    """stdout of `python -c code *args` for each (args, env update) in `runs`, run at once from the project root (each
    one's time is mostly imports); every run must succeed."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(toy.__file__)))
    procs = [subprocess.Popen([sys.executable, "-c", code, *args], cwd=root, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, **env}) for args, env in runs]
    outs = [p.communicate() for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    return [out for out, _ in outs]


def test_the_tiny_generators_tokenizer_is_the_same_in_every_process():
    """tokenizers' BPE trainer numbers single characters in a per-process order; toy renumbers them."""
    code = "import json, toy.models as m; print(json.dumps(m._clip_tokenizer(m.world_prompts(300))[1], sort_keys=True))"
    outs = python_side_by_side(code, [((), {})] * 3)
    assert outs[0] == outs[1] == outs[2] != ""


def test_the_execution_reasoning_determines_the_score():
    """A critic can only learn a score its reasoning text determines: with a noiseless teacher, equal reasoning
    (everything before the verdict) must never come with different scores."""
    rng, judge, seen = random.Random(3), toy.OracleJudge(noise=0.0), {}
    for i in range(3000):
        src = toy.random_scene(rng)
        edit = toy.random_edit(rng, src)
        out, _ = toy.simulate_editor(rng, src, edit, rng.choice(toy.EDITORS))
        text, score = judge.judge_edit(str(i), src, out, edit)["execution"]
        reasoning = json.loads(text)["reasoning"]  # from the change list on: the descriptions before it add detail
        reasoning = reasoning[reasoning.index("Changes: "):].rsplit(" Execution ", 1)[0]
        assert seen.setdefault(reasoning, score) == score, reasoning


def test_the_gen_analysis_shows_what_was_seen_beside_each_verdict():
    """The gen analysis restates the prompt and describes the image, then gives each checklist item what was seen for
    it and the verdict: a critic can learn the verdict as a comparison of two neighbouring values only if "yes" means
    exactly that the value seen is the value the prompt asks for."""
    rng, judge = random.Random(5), toy.OracleJudge(noise=0.0)
    verdicts = set()
    for i in range(300):
        want = toy.random_scene(rng)
        got, deg = toy.simulate_generator(rng, want, rng.choice(toy.GENERATORS))
        lines = judge.judge_gen(str(i), want, got, deg)["instruction"][0].split("\n")
        assert lines[:2] == [f"Asked: {toy.describe(want)}.", f"Seen: {toy.describe(got)}."]
        for line, (item, kind, oid, ok) in zip(lines[2:], toy.world.check_items(want, got)):
            assert line.split(": ", 1)[0].endswith(item)  # "1. a green circle"
            seen_value, verdict = line.split(": ", 1)[1].rsplit(", ", 1)
            asked = toy.world.item_value(want, kind, oid)
            assert seen_value == toy.world.item_value(got, kind, oid)
            assert verdict == ("yes" if ok else "no") and ok == (seen_value == asked), (line, asked)
            verdicts.add((kind, verdict))
    assert len(verdicts) == 8  # every kind of item, each both satisfied and not


def test_the_two_descriptions_determine_the_change_list():
    """The edit answers describe both images, then list the changes: a critic can read the list off its own two
    descriptions only if equal descriptions never come with different changes (tints and nudges included)."""
    rng, judge, seen = random.Random(4), toy.OracleJudge(noise=0.0), {}
    for i in range(3000):
        src = toy.random_scene(rng)
        edit = toy.random_edit(rng, src)
        out, _ = toy.simulate_editor(rng, src, edit, rng.choice(toy.EDITORS))
        reasoning = json.loads(judge.judge_edit(str(i), src, out, edit)["consistency"][0])["reasoning"]
        looked, rest = reasoning.split(" Changes: ")
        changes = rest.split(". Unrequested")[0]
        assert looked == f"Image 1: {toy.describe(src)}. Image 2: {toy.describe(out)}."
        assert seen.setdefault(looked, changes) == changes, looked
        if toy.describe(src) == toy.describe(out):
            assert changes == "nothing"


def test_dense_labels_name_what_each_image_token_shows():
    # a large red square in the centre cell: at 64 px it spans x, y ~ 17..47, i.e. tokens 1..2 of 0..3 each way
    scene = Scene("white", [Obj(0, "square", "red", "large", 1, 1)])
    lab = toy.dense_labels(scene, 64)
    assert lab["blocks"].shape == (16, 16)
    white, red = list(toy.BACKGROUNDS).index("white"), len(toy.BACKGROUNDS) + list(toy.COLORS).index("red")
    corner, centre = 0, 1 * 4 + 1  # tokens (row 0, col 0) and (row 1, col 1), row-major
    assert (lab["blocks"][corner] == white).all() and (lab["blocks"][centre] == red).all()
    assert (lab["shape"][corner], lab["size"][corner], lab["cell"][corner]) == (3, 3, 9)  # "none"
    assert (lab["shape"][centre], lab["size"][centre], lab["cell"][centre]) == (1, 2, 4)  # square, large, centre
    assert set(lab["cell"][[5, 6, 9, 10]]) == {4} and (lab["cell"][[0, 3, 12, 15]] == 9).all()
    scene.objects[0].tint = 1  # darker: its own class
    assert (toy.dense_labels(scene, 64)["blocks"][centre] == red + len(toy.COLORS)).all()


def test_vision_pretraining_teaches_the_tower_what_each_token_shows(critic_base):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    import numpy as np
    model = AutoModelForImageTextToText.from_pretrained(critic_base)
    image_processor = AutoProcessor.from_pretrained(critic_base).image_processor
    _, labels = toy.models._vision_batch(random.Random("0:held-out"), 128, 64)  # the held-out set pretrain_vision uses
    majority = {k: np.bincount(v.reshape(-1).numpy()).max() / v.numel() for k, v in labels.items()}
    acc = toy.pretrain_vision(model, image_processor, steps=100, batch=16, log=lambda *_: None)
    assert acc["blocks"] > majority["blocks"] + 0.1, (acc, majority)  # measured: 0.85 vs 0.72 after 120 steps
    assert acc["size"] > majority["size"] + 0.2, (acc, majority)  # 0.96 vs 0.64


# -----------------------------------------------------------------------------
# the world's judges as critics (toy.judges:pixel / pixel_sum, toy.oracle:noisy / direct / teacher)

def gen_item(image, scene):
    return {"image": image, "prompt": toy.gen_prompt(scene), "record": {"id": "g0", "toy": {"scene": scene.to_dict()}}}


def edit_item(src, edit, edited):
    return {"source": toy.render(src, 64), "edited": edited, "instruction": toy.instruction(src, edit),
            "record": {"id": "e0", "toy": {"scene": src.to_dict(), "edit": edit}}}


def test_pixel_critic_gives_a_perfect_rendering_5_and_an_empty_canvas_1():
    import toy.judges
    scene, critic = two_objects(), toy.judges.pixel()
    perfect, empty = toy.render(scene, 32), toy.render(Scene("white"), 32)
    [ok], [bad] = critic.score("instruction", [gen_item(perfect, scene)]), critic.score("instruction", [gen_item(empty, scene)])
    assert (ok.scores, ok.ok, ok.how) == ([5.0], True, "pixel") and bad.scores == [1.0]
    assert json.loads(ok.text) == {"reasoning": "objects 1.00, background 1.00", "score": [5.0]}
    assert critic.score("quality", [gen_item(empty, scene)])[0].scores == [5, 5, 5]  # QMA = the instruction score


def test_pixel_critic_scores_are_one_plus_four_times_the_judges_fractions():
    import toy.judges
    scene = two_objects()
    half = toy.render(Scene("white", scene.objects[:1]), 32)  # the blue square missing
    parts = toy.pixel_judge_gen(half, scene)
    assert 0 < parts["objects"] < 1 and parts["background"] == 1.0
    [j] = toy.judges.pixel().score("instruction", [gen_item(half, scene)])
    assert j.scores == [1 + 4 * parts["objects"] * parts["background"]]
    [s] = toy.judges.pixel_sum().score("instruction", [gen_item(toy.render(Scene("white"), 32), scene)])
    assert s.scores == [3.0]  # the hackable sum: an empty canvas of the right background earns half
    with pytest.raises(ValueError, match="generations only"):
        toy.judges.pixel_sum().score("execution", [edit_item(scene, RECOLOR, toy.render(scene, 64))])


def test_pixel_critic_gives_a_perfect_edit_5_5_and_an_unchanged_source_1_5():
    import toy.judges
    src, critic = two_objects(), toy.judges.pixel()
    done = edit_item(src, RECOLOR, toy.render(toy.apply_edit(src, RECOLOR), 64))
    same = edit_item(src, RECOLOR, toy.render(src, 64))
    assert [j.scores for m in ("execution", "consistency") for j in critic.score(m, [done, same])] == [[5.0], [1.0], [5.0], [5.0]]


def test_the_worlds_judges_name_the_item_without_ground_truth():
    import toy.judges
    import toy.oracle
    from common import DataError
    scene = two_objects()
    item = gen_item(toy.render(scene, 32), scene)
    item["record"] = {"id": "real-7", "prompt": "a cat"}
    for critic in (toy.judges.pixel(), toy.oracle.noisy()):
        with pytest.raises(DataError, match=r"item 'real-7': field 'toy' lacks scene"):
            critic.score("instruction", [item])
    with pytest.raises(DataError, match="has no 'record'"):
        toy.judges.pixel().score("instruction", [{"image": item["image"]}])
    with pytest.raises(DataError, match=r"candidate 'c1': field 'toy' lacks"):
        toy.oracle.teacher().edit({"id": "c1", "instruction": "x"})


def test_oracle_critics_return_the_teachers_own_scores_through_the_parser():
    import toy.oracle
    rng, items = random.Random(5), {"edit": [], "gen": []}
    for i in range(40):
        src = toy.random_scene(rng)
        edit = toy.random_edit(rng, src)
        out, degrade = toy.simulate_editor(rng, src, edit, rng.choice(toy.EDITORS))
        items["edit"].append({"record": {"id": f"e{i}", "toy": {"scene": src.to_dict(), "out_scene": out.to_dict(), "edit": edit}}})
        got, degrade = toy.simulate_generator(rng, src, rng.choice(toy.GENERATORS))
        items["gen"].append({"record": {"id": f"g{i}", "toy": {"scene": src.to_dict(), "out_scene": got.to_dict(), "degrade": degrade}}})
    S = lambda d: Scene.from_dict(d)
    for factory, mode in ((toy.oracle.noisy, "report"), (toy.oracle.direct, "direct")):
        judge = toy.OracleJudge(0.15, mode)
        for m in ("execution", "consistency", "instruction", "quality"):
            kind = "edit" if m in ("execution", "consistency") else "gen"
            got = factory().score(m, items[kind])
            for j, it in zip(got, items[kind]):
                t = it["record"]["toy"]
                want = (judge.judge_edit(it["record"]["id"], S(t["scene"]), S(t["out_scene"]), t["edit"]) if kind == "edit"
                        else judge.judge_gen(it["record"]["id"], S(t["scene"]), S(t["out_scene"]), t["degrade"]))[m]
                assert j.ok and j.text == want[0] and j.scores == (want[1] if m == "quality" else [want[1]])


def test_the_seeing_teacher_answers_on_clean_renders_as_the_teacher_does_on_their_scenes():
    """toy.oracle:seeing reads the scene from the image (exact on clean renders), then answers as toy.oracle:noisy;
    a blank canvas is read as no objects, so a generation of one scores what an empty scene does."""
    import toy.oracle
    rng, seeing, noisy = random.Random(7), toy.oracle.seeing(), toy.oracle.noisy()
    for i in range(6):
        src = toy.random_scene(rng)
        edit = toy.random_edit(rng, src)
        out, _ = toy.simulate_editor(rng, src, edit, "perfect")
        got, _ = toy.simulate_generator(rng, src, rng.choice(["correct", "missing_object", "wrong_attribute"]))
        e = {"record": {"id": f"e{i}", "toy": {"scene": src.to_dict(), "edit": edit}}, "source": toy.render(src, 64),
             "edited": toy.render(out, 64), "instruction": toy.instruction(src, edit)}
        g = {"record": {"id": f"g{i}", "toy": {"scene": src.to_dict()}}, "image": toy.render(got, 64), "prompt": toy.gen_prompt(src)}
        known = lambda it, scene: {**it, "record": {**it["record"], "toy": {**it["record"]["toy"], "out_scene": scene.to_dict()}}}
        for m, it, scene in (("execution", e, out), ("consistency", e, out), ("instruction", g, got)):
            assert seeing.score(m, [it])[0].scores == noisy.score(m, [known(it, scene)])[0].scores, (i, m)
    blank = {"record": {"id": "g9", "toy": {"scene": src.to_dict()}}, "image": toy.render(Scene(src.background), 64),
             "prompt": toy.gen_prompt(src)}
    assert seeing.score("instruction", [blank])[0].scores == noisy.score("instruction", [
        {"record": {"id": "g9", "toy": {"scene": src.to_dict(), "out_scene": Scene(src.background).to_dict()}}}])[0].scores


def test_teacher_writes_the_report_or_plan_then_the_answers_and_nothing_first_when_direct():
    import toy.oracle
    src = two_objects()
    out = toy.apply_edit(src, RECOLOR)
    record = {"id": "edit-train-000003", "toy": {"scene": src.to_dict(), "out_scene": out.to_dict(), "edit": RECOLOR}}
    report, answers = toy.oracle.teacher().edit(record)
    assert report == toy.OracleJudge(0.15).difference_report(src, out) and report.startswith("Obvious changes:")
    assert answers == {m: a[0] for m, a in toy.OracleJudge(0.15, "report").judge_edit(record["id"], src, out, RECOLOR).items()}
    assert toy.oracle.teacher().edit(record, direct=True)[0] is None
    plan, answers = toy.oracle.teacher().gen({"id": "g", "toy": {"scene": src.to_dict(), "out_scene": src.to_dict()}})
    assert plan.startswith("Analysis plan:") and "\\boxed{" in answers["instruction"] and set(answers) == {"instruction", "quality"}


# -----------------------------------------------------------------------------
# the world's data (python -m toy world, python -m toy critic-base; the mini_data fixture runs both around curate.py)

def world_args(*argv):
    import argparse
    ap = argparse.ArgumentParser()
    toy.data.world_args(ap)
    return ap.parse_args(list(argv))


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
    args = world_args("--balance-share", "1.0")
    scores = []
    for i in range(100):
        item, src, out, _ = toy.data.edit_candidate("train", i, args)
        assert item["toy"]["balanced"]
        scores.append(toy.execution_score(src, out, item["toy"]["edit"]))
    assert sum(s <= 2 for s in scores) / len(scores) > 0.7


def test_world_images_are_the_same_in_every_process(tmp_path):
    """Degradation noise is seeded from the id, never from hash(), which Python salts per process."""
    code = ("import argparse, sys, pathlib, toy.data as d; ap = argparse.ArgumentParser(); d.world_args(ap); "
            "a = ap.parse_args([]); item, src, out, deg = d.edit_candidate('train', 0, a); deg = dict(deg or {}, noise=3); "
            "root = pathlib.Path(sys.argv[1]); (root / 'images').mkdir(parents=True); "
            "d.write_edit_images(root, item, src, out, deg, 64)")
    python_side_by_side(code, [((str(tmp_path / str(k)),), {"PYTHONHASHSEED": str(k)}) for k in (1, 2)])
    a, b = (sorted((tmp_path / str(k) / "images").iterdir()) for k in (1, 2))
    assert [p.name for p in a] == [p.name for p in b] and all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))
    assert toy.data.noise_seed("edit-train-000007") == 2718243933  # crc32 of the id: the same on every machine


# -----------------------------------------------------------------------------
# the teacher's perception (toy/perception.py): scenes read back from the pixels

def varied_scenes(n, seed=0):
    """Random scenes, a third of their objects also medium, tinted or nudged (as the simulated editors make them)."""
    rng = random.Random(seed)
    scenes = []
    for _ in range(n):
        s = toy.random_scene(rng)
        for o in s.objects:
            if rng.random() < 0.33:
                setattr(o, *rng.choice([("size", "medium"), ("tint", 1), ("dx", rng.choice([-toy.NUDGE, toy.NUDGE]))]))
        scenes.append(s)
    return scenes


def test_exact_renders_are_read_back_exactly_at_32_and_64_px():
    """Measured: 300 of 300 (150 at each size)."""
    from toy.perception import match_ids, perceive
    scenes, hits = varied_scenes(300), 0
    for i, s in enumerate(scenes):
        got, degrade = perceive(toy.render(s, (32, 64)[i % 2]))
        assert [o.id for o in got.objects] == list(range(len(s.objects)))  # ids in reading order
        assert [(o.row, o.col) for o in got.objects] == sorted((o.row, o.col) for o in got.objects)
        hits += match_ids(got, s) == s and degrade is None  # every attribute, paired back to the scene's ids
    assert hits >= 0.98 * len(scenes)
    seen = lambda attr: {getattr(o, attr) for s in scenes for o in s.objects}
    assert seen("shape") == set(toy.SHAPES) and seen("color") == set(toy.COLORS) and seen("size") == {"small", "medium", "large"}
    assert {s.background for s in scenes} == set(toy.BACKGROUNDS) and seen("tint") == {0, 1} and len(seen("dx")) == 3


def test_degraded_renders_are_mostly_read_right_and_their_degradation_seen():
    """Measured (64 px, 100 scenes each): the degraded editor's noise or blur 1-2, 100/100 scenes and 100/100
    degradations exact; the generators' 1-2 of noise / blur / washed at 1-4, 90/100 scenes and 82/100
    degradations (heavy noise on washed-out colours is where it fails)."""
    from toy.perception import match_ids, perceive
    rng = random.Random(1)
    for draw, want_scene, want_degrade in [
            (lambda: {rng.choice(["noise", "blur"]): rng.choice([1, 2])}, 0.95, 0.9),
            (lambda: {k: rng.choice([1, 2, 3, 4]) for k in rng.sample(["noise", "blur", "washed"], rng.choice([1, 1, 2]))}, 0.85, 0.7)]:
        scenes, degrades = varied_scenes(100, seed=rng.random()), [draw() for _ in range(100)]
        read = [perceive(toy.render(s, 64, d, seed=i)) for i, (s, d) in enumerate(zip(scenes, degrades))]
        assert sum(match_ids(g, s) == s for s, (g, _) in zip(scenes, read)) >= want_scene * len(scenes)
        assert sum(d == g for d, (_, g) in zip(degrades, read)) >= want_degrade * len(scenes)


def test_a_blurry_image_gets_a_plausible_but_imperfect_reading():
    """A render downsampled to 8 px and up again (bicubic), the look of the tiny policies' samples. Measured on
    100 scenes: background right 100/100, the right colours 94/100, every attribute 73/100; seen as blurred at
    severity 4 98/100, 3 2/100."""
    from toy.perception import match_ids, perceive
    scenes = [toy.random_scene(random.Random(f"blurry:{i}")) for i in range(100)]
    read = [perceive(toy.render(s, 64).resize((8, 8), Image.BILINEAR).resize((64, 64), Image.BICUBIC)) for s in scenes]
    assert all(isinstance(g, Scene) and d["blur"] >= 3 for g, d in read)
    read = [g for g, _ in read]
    assert sum(g.background == s.background for s, g in zip(scenes, read)) >= 95
    assert sum(sorted(o.color for o in g.objects) == sorted(o.color for o in s.objects) for s, g in zip(scenes, read)) >= 80
    assert 50 <= sum(match_ids(g, s) == s for s, g in zip(scenes, read)) < 100


def test_read_objects_take_the_ids_of_the_objects_they_look_like():
    from toy.perception import match_ids
    src = two_objects()  # red circle 0 at the top left, blue square 1 at the bottom right
    seen = Scene("white", [Obj(0, "square", "blue", "small", 0, 0), Obj(1, "circle", "red", "large", 2, 2),
                           Obj(2, "triangle", "green", "small", 1, 1)])
    got = match_ids(seen, src)  # both moved, and a new green triangle
    assert [(o.id, o.name) for o in got.objects] == [(0, "red circle"), (1, "blue square"), (100, "green triangle")]
    # an edit's result is paired with the source and the requested result: a replaced object is the same object
    replaced = Scene("white", [Obj(0, "triangle", "green", "large", 0, 0), Obj(1, "square", "blue", "small", 2, 2)])
    target = toy.apply_edit(src, {"op": "replace", "target": 0, "shape": "triangle", "color": "green"})
    assert [(o.id, o.name) for o in match_ids(replaced, src).objects] == [(1, "blue square"), (100, "green triangle")]
    assert match_ids(replaced, src, target) == target


# -----------------------------------------------------------------------------
# the policies' own samples (python -m toy policy-candidates), on tiny untrained policies

POLICY_SMALL = ["--gen", "5", "--edit", "4", "--bench-exec", "3", "--bench-cons", "2", "--bench-gen", "3", "--batch-size", "4"]
MANIFESTS = ["gen/candidates.jsonl", "edit/candidates.jsonl", "bench/gen.jsonl", "bench/edit_execution.jsonl",
             "bench/edit_consistency.jsonl"]


@pytest.fixture(scope="module")
def policy_data(mini_data, tmp_path_factory):
    """A copy of the mini dataset with the samples of a 16 px generator (2 pre-training steps) and a randomly
    initialised editor added, then the command run again; the manifests' bytes before, after the first run, after
    the second."""
    import shutil
    import rl_edit
    root = tmp_path_factory.mktemp("policy")
    toy.main(["pretrain-gen", "--out", str(root / "gen"), "--steps", "2", "--batch-size", "4", "--size", "16"])
    rng = random.Random(0)
    texts = [toy.edit_triple(rng)[3] for _ in range(300)] + [rl_edit.SYSTEM_PREFIX + rl_edit.USER_TURN] * 20
    toy.build_tiny_editor(str(root / "edit"), texts, layers=1, heads=2, head_dim=24)
    data = root / "data"
    shutil.copytree(mini_data, data)
    runs = [{m: (data / m).read_bytes() for m in MANIFESTS}]
    for _ in range(2):
        toy.main(["policy-candidates", "--data", str(data), "--gen-base", str(root / "gen"), "--edit-base",
                  str(root / "edit"), *POLICY_SMALL])
        runs.append({m: (data / m).read_bytes() for m in MANIFESTS})
    return data, runs


def test_policy_samples_are_appended_in_the_simulated_candidates_schema(policy_data):
    import curate
    data, (before, after, _) = policy_data
    for kind, n, images in (("gen", 5, ("image",)), ("edit", 4, ("source", "edited"))):
        path = data / kind / "candidates.jsonl"
        assert after[f"{kind}/candidates.jsonl"].startswith(before[f"{kind}/candidates.jsonl"])  # appended only
        rows = read_jsonl(path)
        new = [r for r in rows if r.get("origin") == "policy"]
        assert len(new) == n and all(r["id"].startswith(f"p{kind}-train-") for r in new)
        assert not any("origin" in r for r in rows[:len(rows) - n])  # the simulated ones: unmarked, as before
        simulated = rows[0]
        for r in new:
            assert set(r) == set(simulated) | {"origin"} and set(r["toy"]) >= set(simulated["toy"]) - {"balanced"}
            assert r["toy"]["generator" if kind == "gen" else "editor"] == "policy"
            for key in images:
                assert Image.open(data / kind / r[key]).size == (64, 64)
            assert all(isinstance(Scene.from_dict(r["toy"][k]), Scene) for k in ("scene", "out_scene"))
            assert r["toy"]["degrade"] is None or set(r["toy"]["degrade"]) <= {"noise", "blur", "washed"}
        assert len(curate.read_candidates(path, kind)) == len(rows)  # what curate.py checks before judging
        answers = getattr(toy.oracle.teacher(), kind)(new[0])[1]  # and the teacher judges them
        assert all(parse_score(a, 3 if m == "quality" else 1, m).ok for m, a in answers.items())


def test_policy_samples_join_the_bench_scored_by_the_rubric_on_the_scene_read_back(policy_data):
    data, (before, after, _) = policy_data
    train = {json.dumps([r["toy"]["scene"], r["toy"].get("edit")], sort_keys=True)
             for kind in ("gen", "edit") for r in read_jsonl(data / kind / "candidates.jsonl") if r.get("origin")}
    for name, n, mode, fn in [("gen", 3, "instruction", lambda t: toy.instruction_score(*scenes(t))),
                              ("edit_execution", 3, "execution", lambda t: toy.execution_score(*scenes(t), t["edit"])),
                              ("edit_consistency", 2, "consistency", lambda t: toy.consistency_score(*scenes(t), t["edit"]))]:
        assert after[f"bench/{name}.jsonl"].startswith(before[f"bench/{name}.jsonl"])
        rows = [r for r in read_jsonl(data / "bench" / f"{name}.jsonl") if r.get("origin") == "policy"]
        assert len(rows) == n and all(r["mode"] == mode for r in rows)
        for r in rows:
            assert type(r["human_score"]) is int and 1 <= r["human_score"] <= 5 and r["human_score"] == fn(r["toy"])
            assert json.dumps([r["toy"]["scene"], r["toy"].get("edit")], sort_keys=True) not in train
            for key in ("image", "source", "edited"):
                assert key not in r or (data / "bench" / r[key]).is_file()


def scenes(t):
    return Scene.from_dict(t["scene"]), Scene.from_dict(t["out_scene"])


def test_policy_candidates_rerun_adds_nothing_and_one_half_runs_without_the_other_policy(policy_data, tmp_path):
    data, (_, after, again) = policy_data
    assert after == again
    gen_only = ["--gen", "5", "--bench-gen", "3", "--edit", "0", "--bench-exec", "0", "--bench-cons", "0", "--batch-size", "4"]
    toy.main(["policy-candidates", "--data", str(data), "--gen-base", str(data.parent / "gen"), "--edit-base",
              str(tmp_path / "no-editor"), *gen_only])
    assert {m: (data / m).read_bytes() for m in MANIFESTS} == after
    assert json.loads((data / "policy_candidates.json").read_text())["policy_records"]["bench/edit_execution.jsonl"] == 3
