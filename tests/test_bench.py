"""bench.py: metrics against hand-computed values, the bench reader's errors, failure accounting, the critics CLI
(resume, two ranks under torchrun, a factory critic handed each item's record), policy evaluation with stub
policies and the paper's fusions; toy/report.py, the miniature run's report."""

import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

import bench
import toy
import toy.report
from common import DataError, read_jsonl

ROOT = Path(__file__).resolve().parents[1]


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# -----------------------------------------------------------------------------
# metrics


def test_mae_is_mean_absolute_error():
    assert bench.mae([1, 3, 5], [2, 3, 3]) == pytest.approx(1.0)  # |1-2| + 0 + |5-3| = 3 over 3
    assert math.isnan(bench.mae([], []))


def test_pooled_overall_weights_items_not_groups():
    execution = ([1, 3, 5], [2, 3, 3])  # MAE 1.0 over 3 items
    consistency = ([4], [1])  # MAE 3.0 over 1 item
    # pooled: (1 + 0 + 2 + 3) / 4 = 1.5, not the mean of the two MAEs (2.0)
    assert bench.pooled_mae([execution, consistency]) == pytest.approx(1.5)


def test_pairwise_accuracy_hand_computed():
    assert bench.pairwise_accuracy([1, 3, 2], [1, 2, 3]) == pytest.approx(2 / 3)  # pair (2,3) reversed
    assert bench.pairwise_accuracy([3, 3], [1, 2]) == pytest.approx(0.5)  # a tied prediction earns half
    # the pair with equal human scores is not counted: (2<3 right), (2<3 but 5>4 wrong)
    assert bench.pairwise_accuracy([1, 5, 4], [2, 2, 3]) == pytest.approx(0.5)
    assert math.isnan(bench.pairwise_accuracy([1, 2], [3, 3]))


def test_spearman_hand_computed_with_and_without_ties():
    assert bench.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 1 - 6*2 / (4*15)
    # ties get average ranks: x ranks (1.5, 1.5, 3); r = 1.5 / sqrt(1.5 * 2)
    assert bench.spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(1.5 / math.sqrt(3))
    assert math.isnan(bench.spearman([3, 3, 3], [1, 2, 3]))  # a constant predictor has no correlation


def test_group_metrics_count_failures_and_missing_and_charge_worst_error():
    m = bench.group_metrics([1, 3, 5, 2], [2, "fail", "missing", 2])
    assert (m["n"], m["parsed"], m["failures"], m["missing"]) == (4, 2, 1, 1)
    assert m["mae"] == pytest.approx(0.5)  # over the parsed items: (1 + 0) / 2
    assert m["mae_fail_worst"] == pytest.approx((1 + 2 + 4 + 0) / 4)  # worst error for h=3 is 2, for h=5 is 4


def test_confusion_puts_failures_in_the_last_column():
    m = bench.confusion([1, 5, 3], [1.0, "fail", 3.6])
    assert m[0][0] == 1 and m[4][5] == 1 and m[2][3] == 1 and sum(map(sum, m)) == 3


def test_mean_ci_is_normal_approximation():
    mean, ci = bench.mean_ci([0.0, 1.0, 0.0, 1.0])
    assert mean == pytest.approx(0.5)
    assert ci == pytest.approx(1.96 * math.sqrt(1 / 3) / 2)  # sample std sqrt(1/3), n = 4


# -----------------------------------------------------------------------------
# bench reader


def tiny_bench(d, n_exec=3, n_cons=2, n_gen=2):
    """A mini-layout bench without images (enough for file/constant critics)."""
    e = lambda s, i, h: {"id": f"{s}{i}", "source": "a.png", "edited": "b.png", "instruction": "do it", "human_score": h}
    write_jsonl(d / "edit_execution.jsonl", [e("x", i, h) for i, h in enumerate([1, 3, 5][:n_exec])])
    write_jsonl(d / "edit_consistency.jsonl", [e("c", i, h) for i, h in enumerate([2, 4][:n_cons])])
    write_jsonl(d / "gen.jsonl", [{"id": f"g{i}", "image": "g.png", "prompt": "a cat", "difficulty": dif, "human_score": h}
                                  for i, (dif, h) in enumerate([("easy", 4), ("hard", 2)][:n_gen])])
    return d


def test_reader_rejects_missing_field_naming_field_and_line(tmp_path):
    d = tiny_bench(tmp_path)
    rows = read_jsonl(d / "edit_execution.jsonl")
    del rows[1]["human_score"]
    write_jsonl(d / "edit_execution.jsonl", rows)
    with pytest.raises(DataError, match=r"edit_execution.jsonl:2: missing field 'human_score'.*--field-map"):
        bench.read_bench(d)


def test_reader_rejects_a_score_outside_1_to_5(tmp_path):
    d = tiny_bench(tmp_path)
    rows = read_jsonl(d / "gen.jsonl")
    rows[0]["human_score"] = 7
    write_jsonl(d / "gen.jsonl", rows)
    with pytest.raises(DataError, match=r"gen.jsonl:1: field 'human_score'.*not a score in 1..5"):
        bench.read_bench(d)


def test_field_map_renames_fields_and_rejects_unknown_keys(tmp_path):
    d = tiny_bench(tmp_path)
    for f in ("edit_execution", "edit_consistency", "gen"):
        rows = read_jsonl(d / f"{f}.jsonl")
        write_jsonl(d / f"{f}.jsonl", [{**{k: v for k, v in r.items() if k != "human_score"}, "rating": {"v": [r["human_score"]]}}
                                       for r in rows])
    items = bench.read_bench(d, field_map={"human_score": "rating.v.0"})
    assert [it["human_score"] for it in items] == [1, 3, 5, 2, 4, 4, 2]
    with pytest.raises(DataError, match="--field-map key 'gen.humanscore'"):
        bench.read_bench(d, field_map={"gen.humanscore": "x"})


def test_release_layout_joins_human_scores_and_derives_difficulty_from_the_path(tmp_path):
    g = tmp_path / "FIRM-Bench-Gen"
    write_jsonl(g / "bench_v1.jsonl", [{"id": 1, "image": ["en/1.png"], "prompt": "a dog"},
                                       {"id": 2, "image": ["en_long/2.png"], "prompt": "two dogs"}])
    write_jsonl(g / "result" / "human_bench_v1.jsonl", [{"id": 1, "image": ["en/1.png"], "instruction_following": {"score": [5]}},
                                                        {"id": 2, "image": ["en_long/2.png"], "instruction_following": {"score": [2]}}])
    e = tmp_path / "FIRM-Bench-Edit"
    write_jsonl(e / "bench_v1.jsonl", [{"id": "a", "image": ["s.png", "t.png"], "prompt": "edit"},
                                       {"id": "b", "image": ["s.png", "t.png"], "prompt": "edit"}])
    write_jsonl(e / "result" / "human_bench_v1.jsonl", [{"id": "a", "execution": {"score": [4]}},
                                                        {"id": "b", "execution": {"score": [3]}, "consistency": {"score": [1]}}])
    items = bench.read_bench(tmp_path, "firm-release")
    got = {(it["split"], it["id"]): it for it in items}
    assert {k: v["human_score"] for k, v in got.items()} == {("execution", "a"): 4, ("execution", "b"): 3,
                                                              ("consistency", "b"): 1, ("gen", 1): 5, ("gen", 2): 2}
    assert got[("gen", 1)]["difficulty"] == "easy" and got[("gen", 2)]["difficulty"] == "hard"
    assert got[("consistency", "b")]["edited"] == "t.png" and got[("gen", 1)]["root"].endswith("FIRM-Bench-Gen")


# -----------------------------------------------------------------------------
# critics CLI


def test_prediction_file_with_missing_items_and_unparseable_answers_is_reported(tmp_path):
    d = tiny_bench(tmp_path / "bench")
    preds = tmp_path / "preds.jsonl"
    write_jsonl(preds, [{"id": "x0", "mode": "execution", "text": '{"score": [2]}'},  # |2-1| = 1
                        {"id": "x1", "mode": "execution", "text": "I cannot tell."},  # unparseable
                        # x2 missing
                        {"id": "c0", "mode": "consistency", "scores": [2]}, {"id": "c1", "mode": "consistency", "scores": [5]},
                        {"id": "g0", "text": "\\boxed{4}"}, {"id": "g1", "text": "\\boxed{4}"}])
    out = tmp_path / "out"
    bench.main(["critics", "--bench-dir", str(d), "--out", str(out), "--critic", f"p=file:{preds}"])
    m = json.loads((out / "critics.json").read_text())["critics"]["p"]["metrics"]
    assert (m["execution"]["failures"], m["execution"]["missing"], m["execution"]["parsed"]) == (1, 1, 1)
    assert m["execution"]["mae"] == pytest.approx(1.0)
    assert m["execution"]["mae_fail_worst"] == pytest.approx((1 + 2 + 4) / 3)  # h=3 fails (2), h=5 missing (4)
    assert m["edit_overall"]["mae"] == pytest.approx((1 + 0 + 1) / 3)  # pooled over parsed x0, c0, c1
    assert m["gen_easy"]["mae"] == 0 and m["gen_hard"]["mae"] == 2
    md = (out / "critics.md").read_text()
    assert "| p |" in md and "1/7 (14%) | 1 |" in md  # failures and missing visible in the table
    assert (out / "confusion_p.png").is_file()
    # a changed prediction file (another critic) is not mixed with the saved predictions: they are redone
    write_jsonl(preds, [{"id": i, "scores": [3]} for i in ("x0", "x1", "x2", "c0", "c1", "g0", "g1")])
    bench.main(["critics", "--bench-dir", str(d), "--out", str(out), "--critic", f"p=file:{preds}"])
    m = json.loads((out / "critics.json").read_text())["critics"]["p"]["metrics"]
    assert m["edit_overall"]["parsed"] == 5 and m["execution"]["mae"] == pytest.approx((2 + 0 + 2) / 3)


def test_critics_cli_on_miniature_bench_counts_base_failures_and_resumes(mini_data, critic_base, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["critics", "--bench-dir", str(mini_data / "bench"), "--out", str(out), "--limit", "4", "--max-new-tokens", "8",
            "--sft-dir", str(mini_data / "sft"), "--threads", "1", "--critic", f"base={critic_base}", "--critic", "constant=constant",
            "--critic", "teacher=toy.oracle:noisy"]
    with pytest.raises(SystemExit) as exit:  # a critic the user names must exist: an error before anything is scored
        bench.main(argv + ["--critic", "missing=/nonexistent/critic@edit"])
    assert exit.value.code == 2 and "--critic missing: not found: /nonexistent/critic" in capsys.readouterr().err
    assert not out.exists()
    bench.main(argv)
    res = json.loads((out / "critics.json").read_text())["critics"]
    base = res["base"]["metrics"]
    assert base["edit_overall"]["failures"] + base["edit_overall"]["parsed"] == 8  # every item counted, none dropped
    assert res["teacher"]["metrics"]["gen_overall"]["parsed"] == 4
    # a killed run: keep 3 predictions of the base critic; the rerun scores only the rest
    pf = out / "preds" / "base" / "predictions.jsonl"
    pf.write_text("".join(pf.read_text().splitlines(True)[:3]))
    capsys.readouterr()
    bench.main(argv)
    log = capsys.readouterr().out
    assert "[base] rank 0: execution 1/1" in log and "[teacher] rank 0" not in log
    assert len(read_jsonl(pf)) == 12 and json.loads((out / "critics.json").read_text())["critics"]["base"] == res["base"]


def test_two_ranks_under_torchrun_shard_and_merge_like_one(mini_data, tmp_path):
    common = ["critics", "--bench-dir", str(mini_data / "bench"), "--limit", "5", "--critic", "teacher=toy.oracle:noisy",
              "--critic", "three=constant:3"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "bench.py")]
    r = subprocess.run(cmd + common + ["--out", str(tmp_path / "two")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    bench.main(common + ["--out", str(tmp_path / "one")])
    two, one = (json.loads((tmp_path / o / "critics.json").read_text())["critics"] for o in ("two", "one"))
    assert all(two[c]["metrics"] == one[c]["metrics"] for c in ("teacher", "three"))
    keys = [r["key"] for r in read_jsonl(tmp_path / "two" / "preds" / "teacher" / "predictions.jsonl")]
    assert len(keys) == len(set(keys)) == 15 and not list((tmp_path / "two" / "preds").glob("*/part-*.jsonl"))


STANDIN = """
import reward
SEEN = []

class Knows:
    \"\"\"A stand-in critic that knows the answer: it reads it from each item's record.\"\"\"
    def score(self, mode, items, method="generate", samples=1):
        SEEN.extend((mode, it) for it in items)
        return [reward.Judgement([it["record"]["{field}"]] * reward.N_SCORES[mode], "", True) for it in items]

def knows():
    return Knows()
"""


def standin_factory(tmp_path, monkeypatch, name, field):
    """A factory module `name` on sys.path whose critic answers record[field] for every score."""
    (tmp_path / f"{name}.py").write_text(STANDIN.replace("{field}", field))
    monkeypatch.syspath_prepend(str(tmp_path))
    return __import__(name)


def test_a_factory_critic_is_handed_each_bench_row_as_the_record(tmp_path, monkeypatch):
    d = tiny_bench(tmp_path / "bench")
    for f in ("a.png", "b.png", "g.png"):
        toy.render(toy.Scene("white", []), 16).save(d / f)
    module = standin_factory(tmp_path, monkeypatch, "bench_standin_critic", "human_score")
    out = tmp_path / "out"
    bench.main(["critics", "--bench-dir", str(d), "--out", str(out), "--critic", "knows=bench_standin_critic:knows"])
    m = json.loads((out / "critics.json").read_text())["critics"]["knows"]["metrics"]
    assert m["edit_overall"]["mae"] == m["gen_overall"]["mae"] == 0 and m["edit_overall"]["parsed"] == 5
    seen = {(mode, it["record"]["id"]) for mode, it in module.SEEN}  # the bench rows, one call per item and mode
    assert seen == {("execution", "x0"), ("execution", "x1"), ("execution", "x2"), ("consistency", "c0"),
                    ("consistency", "c1"), ("instruction", "g0"), ("instruction", "g1")}
    assert all(it["edited"].size == (16, 16) for mode, it in module.SEEN if mode != "instruction")  # the images too


def test_a_critic_factory_that_cannot_be_found_is_named_before_anything_is_scored(tmp_path, capsys):
    d = tiny_bench(tmp_path / "bench")
    with pytest.raises(SystemExit) as exit:
        bench.main(["critics", "--bench-dir", str(d), "--out", str(tmp_path / "out"), "--critic", "three=constant:3",
                    "--critic", "gone=no_such_package_here.judges:pixel"])
    assert exit.value.code == 2 and "--critic gone: no Python package for no_such_package_here" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# policy evaluation (stub policies: base draws nothing / leaves the source, tuned draws the exact target)


def stub_policies(monkeypatch, gen_recs, edit_recs):
    S = toy.Scene.from_dict
    by_prompt = {r["prompt"]: S(r["toy"]["scene"]) for r in gen_recs}
    by_instr = {r["prompt"]: S(r["toy"]["target_scene"]) for r in edit_recs}
    gen = types.SimpleNamespace(load_generator=lambda model_dir, lora_dir=None, device=None: lora_dir,
                                generate=lambda g, prompts, seeds, steps=10: [
                                    toy.render(by_prompt[p], 32) if g else toy.render(toy.Scene("white", []), 32) for p in prompts])
    edit = types.SimpleNamespace(load_editor=lambda model_dir, lora_dir=None, device=None: lora_dir,
                                 edit=lambda e, images, instructions, seeds, steps=6: [
                                     toy.render(by_instr[t], im.width) if e else im for im, t in zip(images, instructions)])
    monkeypatch.setitem(sys.modules, "rl_gen", gen)
    monkeypatch.setitem(sys.modules, "rl_edit", edit)


def lora_dir(d):
    """What an RL run leaves in its --out directory (the stub policies never read it)."""
    d.mkdir(parents=True)
    (d / "pytorch_lora_weights.safetensors").write_bytes(b"")
    return d


def test_policy_eval_with_pixel_judge_reports_gain_with_ci_writes_grid_and_resumes(mini_data, tmp_path, monkeypatch, capsys):
    gen_recs, edit_recs = read_jsonl(mini_data / "rl" / "gen_test.jsonl"), read_jsonl(mini_data / "rl" / "edit_test.jsonl")
    stub_policies(monkeypatch, gen_recs, edit_recs)
    lora = lora_dir(tmp_path / "lora")  # the stub ignores it, but a tuned policy must exist
    for kind, recs in (("gen", gen_recs), ("edit", edit_recs)):
        out = tmp_path / "bench" / f"policy_{kind}"
        argv = ["policy", "--kind", kind, "--base", "unused", "--tuned", str(lora), "--prompts",
                str(mini_data / "rl" / f"{kind}_test.jsonl"), "--judge", "toy.judges:pixel", "--samples-per-prompt", "2",
                "--out", str(out)]
        bench.main(argv)
        res = json.loads((out / "policy.json").read_text())
        base, tuned = res["variants"]["base"], res["variants"]["tuned"]
        assert base["n"] == tuned["n"] == 2 * len(recs) and tuned["failures"] == 0
        assert tuned["mean"] > 0.95 > base["mean"] and res["tuned_minus_base"]["mean"] > 0.3
        assert (out / "grid.png").is_file() and "tuned - base" in (out / "policy.md").read_text()
        capsys.readouterr()
        bench.main(argv)
        assert "did" not in capsys.readouterr().out  # a finished run resumes to nothing to do
        seeds = sorted(r["seed"] for r in read_jsonl(out / "scores-base-0.jsonl"))
        assert seeds == sorted(r["seed"] for r in read_jsonl(out / "scores-tuned-0.jsonl")) == list(range(1000, 1000 + 2 * len(recs)))
    # the world's report shows each policy's grid with the exact target beside the samples
    toy.report.main(["--root", str(tmp_path)])
    md = (tmp_path / "REPORT.md").read_text()
    assert "![grid (source | target | base | tuned)](report/policy_edit_grid.png)" in md
    assert "![grid (target | base | tuned)](report/policy_gen_grid.png)" in md and "tuned - base" in md
    assert (tmp_path / "report" / "policy_edit_grid.png").is_file()


def test_policy_eval_puts_several_tuned_editors_side_by_side_with_region_scores(mini_data, tmp_path, monkeypatch):
    gen_recs, edit_recs = read_jsonl(mini_data / "rl" / "gen_test.jsonl"), read_jsonl(mini_data / "rl" / "edit_test.jsonl")
    stub_policies(monkeypatch, gen_recs, edit_recs)
    for d in ("cme", "sum55"):
        lora_dir(tmp_path / d)
    out = tmp_path / "policy_edit"
    bench.main(["policy", "--kind", "edit", "--base", "unused", "--tuned", f"cme={tmp_path / 'cme'}", "--tuned",
                f"sum55={tmp_path / 'sum55'}", "--prompts", str(mini_data / "rl" / "edit_test.jsonl"),
                "--judge", "toy.judges:pixel", "--samples-per-prompt", "1", "--limit", "4", "--out", str(out)])
    res = json.loads((out / "policy.json").read_text())
    assert list(res["variants"]) == ["base", "cme", "sum55"]
    base, cme = res["variants"]["base"], res["variants"]["cme"]
    assert set(base["parts"]) == set(cme["parts"]) == {"execution", "consistency"}
    # the stub base leaves the source unchanged: the pixel judge's kept region (consistency) is perfect, the edited
    # region (execution) is not; CME = E (0.6 + 0.4 C) from the parts
    assert base["parts"]["consistency"] == 1.0 > base["parts"]["execution"] and cme["parts"]["execution"] == 1.0
    scores = read_jsonl(out / "scores-base-0.jsonl")
    assert all(r["score"] == pytest.approx(r["parts"]["execution"] * (0.6 + 0.4 * r["parts"]["consistency"])) for r in scores)
    md = (out / "policy.md").read_text()
    assert "| execution | consistency |" in md and "| cme - base |" in md and "| sum55 - base |" in md


def test_policy_judge_is_any_critic_spec_and_is_handed_each_prompt_record(mini_data, tmp_path, monkeypatch):
    gen_recs, edit_recs = read_jsonl(mini_data / "rl" / "gen_test.jsonl"), read_jsonl(mini_data / "rl" / "edit_test.jsonl")
    stub_policies(monkeypatch, gen_recs, edit_recs)
    module = standin_factory(tmp_path, monkeypatch, "bench_standin_judge", "score_for_test")
    recs = [dict(r, score_for_test=1 + i % 5) for i, r in enumerate(gen_recs)]  # what the stand-in judge answers
    prompts = tmp_path / "gen_test.jsonl"
    write_jsonl(prompts, recs)
    bench.main(["policy", "--kind", "gen", "--base", "unused", "--tuned", str(lora_dir(tmp_path / "lora")), "--prompts",
                str(prompts), "--judge", "bench_standin_judge:knows", "--samples-per-prompt", "1", "--out", str(tmp_path / "out")])
    assert {it["record"]["id"] for _, it in module.SEEN} == {r["id"] for r in recs}
    assert {mode for mode, _ in module.SEEN} == {"instruction", "quality"}  # QMA asks both
    scores = {r["id"]: r for r in read_jsonl(tmp_path / "out" / "scores-tuned-0.jsonl")}
    for r in recs:  # QMA = I (0.4 + 0.6 Q) with I = Q = (s - 1) / 4; the gen parts are the fused score alone
        s = (r["score_for_test"] - 1) / 4
        assert scores[r["id"]]["score"] == pytest.approx(s * (0.4 + 0.6 * s)) and scores[r["id"]]["parts"] == {}


def test_a_bench_that_mixes_simulated_and_policy_samples_is_scored_pooled_and_by_origin():
    item = lambda k, split, h, origin=None: {"key": k, "split": split, "human_score": h,
                                              "record": {"origin": origin} if origin else {}}
    items = [item("a", "execution", 5), item("b", "consistency", 3), item("c", "execution", 1, "policy"),
             item("d", "gen", 4), item("e", "gen", 2, "policy")]
    preds = {k: {"ok": True, "scores": [s]} for k, s in (("a", 4), ("b", 3), ("c", 4), ("d", 4), ("e", 5))}
    ev = bench.evaluate(items, preds)
    assert ev["metrics"]["edit_overall"]["mae"] == pytest.approx(4 / 3) and ev["metrics"]["gen_overall"]["mae"] == 1.5
    bo = ev["by_origin"]
    assert bo["edit_overall[simulated]"]["mae"] == 0.5 and bo["edit_overall[policy]"]["mae"] == 3.0
    assert bo["gen_overall[simulated]"]["mae"] == 0.0 and bo["gen_overall[policy]"]["mae"] == 3.0
    md = bench.critics_markdown({"critics": {"c": {**ev, "note": ""}}})
    assert "| c | 0.50 | 3.00 | 0.00 | 3.00 |" in md
    assert bench.evaluate(items[:2], preds)["by_origin"] == {}  # one origin: nothing to split


def test_within_prompt_ranking_is_spearman_per_prompt_with_ties_of_the_critic_counted_as_no_signal():
    row = lambda pid, k, judge, critic: (f"{pid}#{k}", {"id": pid, "score": judge, "critics": {"c": critic}})
    scores = {"base": dict([row("a", 0, 0.1, 0.2), row("b", 0, 0.3, 0.5), row("t", 0, 0.4, 0.1)]),
              "tuned": dict([row("a", 1, 0.9, 0.8), row("b", 1, 0.6, 0.5), row("t", 1, 0.4, 0.9)])}
    # a: the critic ranks the two samples as the judge does (rho 1); b: one reward for both (no signal: 0);
    # t: the judge ties them, nothing to rank: left out
    res = bench.within_prompt_ranking(scores, "c")
    assert res["prompts"] == 2 and res["spearman"] == pytest.approx(0.5) and res["all_tied"] == 1
    assert res["per_policy"] == pytest.approx({"base": 0.8 / 3, "tuned": 2.2 / 3})


def test_policy_eval_ranks_a_critics_rewards_within_each_prompt_against_the_judge(mini_data, tmp_path, monkeypatch):
    gen_recs, edit_recs = read_jsonl(mini_data / "rl" / "gen_test.jsonl"), read_jsonl(mini_data / "rl" / "edit_test.jsonl")
    stub_policies(monkeypatch, gen_recs, edit_recs)
    out = tmp_path / "out"
    bench.main(["policy", "--kind", "edit", "--base", "unused", "--tuned", str(lora_dir(tmp_path / "lora")), "--prompts",
                str(mini_data / "rl" / "edit_test.jsonl"), "--judge", "toy.judges:pixel", "--critic",
                "same=toy.judges:pixel", "--samples-per-prompt", "1", "--out", str(out)])
    res = json.loads((out / "policy.json").read_text())["critics"]["same"]
    assert res["prompts"] > 0 and res["spearman"] == pytest.approx(1.0) and res["all_tied"] == 0  # the judge itself
    assert "| same | " in (out / "policy.md").read_text()


def test_policy_preset_names_base_and_tuned_editors_and_rejects_a_missing_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    lora_dir(tmp_path / "runs/mini/rl_edit_cme")
    with pytest.raises(SystemExit):  # the 0.5/0.5 ablation is not trained yet
        bench.get_args(["policy", "--preset", "mini", "--kind", "edit"])
    assert "sum55=runs/mini/rl_edit_sum55" in capsys.readouterr().err
    lora_dir(tmp_path / "runs/mini/rl_edit_sum55")
    args = bench.get_args(["policy", "--preset", "mini", "--kind", "edit"])
    assert args.base == "runs/mini/models/edit-base" and args.prompts == "runs/mini/data/rl/edit_test.jsonl"
    assert args.judge == "toy.judges:pixel" and args.out == "runs/mini/bench/policy_edit_pixel"
    assert args.tuned == {"cme": "runs/mini/rl_edit_cme", "sum55": "runs/mini/rl_edit_sum55"}
    lora_dir(tmp_path / "runs/mini/rl_gen")
    lora_dir(tmp_path / "runs/mini/rl_gen_pixel")
    lora_dir(tmp_path / "runs/mini/rl_gen_direct")
    assert bench.get_args(["policy", "--preset", "mini", "--kind", "gen"]).tuned == {
        "qma": "runs/mini/rl_gen", "direct": "runs/mini/rl_gen_direct", "pixel": "runs/mini/rl_gen_pixel"}


# -----------------------------------------------------------------------------
# the miniature run's report (toy/report.py)


def test_report_gathers_what_exists_reads_held_out_numbers_from_eval_jsonl_and_names_what_is_missing(tmp_path):
    root = tmp_path / "mini"
    (root / "bench").mkdir(parents=True)
    (root / "bench" / "critics.md").write_text("| critic | exec MAE |\n|---|---|\n| c | 0.40 |\n")
    write_jsonl(root / "rl_gen" / "metrics.jsonl", [{"step": s, "reward": 0.5 + 0.01 * s, "loss": 1.0} for s in range(20)])
    write_jsonl(root / "rl_edit_cme" / "metrics.jsonl", [{"step": 1, "reward": 0.3, "reward_fail": 0}])
    write_jsonl(root / "rl_edit_cme" / "eval.jsonl", [{"step": 0, "eval_reward": 0.2, "eval_judge": 0.1},
                                                      {"step": 2, "eval_reward": 0.4, "eval_judge": 0.5}])
    (root / "logs").mkdir()
    (root / "logs" / "times.tsv").write_text("world\t0\t12\nedit-critic\t700\t2300\n")  # as run_mini.sh's step writes it
    toy.main(["report", "--root", str(root)])  # python -m toy report
    md = (root / "REPORT.md").read_text()
    assert "| world | 0 | 12 | 12 |" in md and "| edit-critic | 700 | 2300 | 1600 |" in md
    assert "| c | 0.40 |" in md and "| rl_gen | 20 | 0.500 | 0.685 | — |" in md
    assert "| rl_edit_cme | 1 | 0.300 | 0.300 | eval_reward 0.200 -> 0.400; eval_judge 0.100 -> 0.500 |" in md
    assert (root / "report" / "rl_gen_reward.png").is_file() and (root / "report" / "rl_edit_cme_reward.png").is_file()
    assert "_missing: run `python bench.py policy" in md
    (root / "logs" / "times.tsv").write_text("world 0 12\n")  # not tab-separated: the file and line are named
    with pytest.raises(ValueError, match=r"times.tsv:1: expected"):
        toy.main(["report", "--root", str(root)])
