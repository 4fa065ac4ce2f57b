"""What RL would learn from, per scoring method: a critic's fused rewards for the saved samples of a policy
evaluation (bench.py policy), ranked within each prompt against the evaluation's judge, side by side for the
methods "generate" (the integer score), "soft" (its expectation where the critic wrote it) and "expected"
(digit probabilities after a skipped reasoning), and self-ensembles of N sampled answers (--samples).

    python bench.py policy --preset mini --kind gen                       # writes runs/mini/bench/policy_gen_pixel
    python benchmarks/bench_reward_methods.py --eval runs/mini/bench/policy_gen_pixel --critic runs/mini/models/gen-critic
    python benchmarks/bench_reward_methods.py --eval runs/mini/bench/policy_edit_pixel --critic runs/mini/models/edit-critic

Run it from the directory the evaluation was run in (policy.json names the prompts by that path). Prints, per
method: mean within-prompt Spearman (bench.within_prompt_ranking: 0 where one reward is given to all), prompts
with one reward for all, share of samples tied with another sample of their prompt, failures, seconds.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]
import reward  # noqa: E402
from bench import policy_scores, read_parts, score_files, within_prompt_ranking  # noqa: E402
from common import load_image, read_manifest  # noqa: E402


def get_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--eval", required=True, help="a bench.py policy output directory (policy.json, scores-*, images/)")
    ap.add_argument("--critic", required=True, help="a critic model directory (the methods other than generate need one)")
    ap.add_argument("--methods", default=",".join(reward.METHODS), help="comma-separated reward.METHODS")
    ap.add_argument("--samples", default="1", help="comma-separated self-ensemble sizes to add for method generate "
                    "(EditScore's mean of N sampled answers; the checkpoint's sampling settings)")
    ap.add_argument("--seed", type=int, default=0, help="torch seed of the sampled answers")
    ap.add_argument("--batch-size", type=int, default=16, help="items per critic batch")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--out", default=None, help="also write the figures here as JSON")
    return ap.parse_args(argv)


def tied_share(scores, name):
    """Share of samples whose reward equals another sample's of the same prompt (no group advantage between them)."""
    by_prompt, tied, n = {}, 0, 0
    for rows in scores.values():
        for r in rows.values():
            if (c := r["critics"].get(name)) is not None:
                by_prompt.setdefault(r["id"], []).append(c)
    for xs in by_prompt.values():
        tied += sum(xs.count(x) > 1 for x in xs)
        n += len(xs)
    return tied / max(n, 1)


def main(args):
    torch.set_num_threads(args.threads)
    ev = Path(args.eval)
    meta = json.loads((ev / "policy.json").read_text())
    kind, variants = meta["kind"], ["base", *meta["tuned"]]
    recs = {r["id"]: r for r in read_manifest(meta["prompts"], {"id": "id", "prompt": "text", "image": "image?",
                                                                "requirement": "str?"}, images="exist")}
    base_dir = Path(meta["prompts"]).parent
    scores = {v: read_parts(score_files(ev, v), "uid") for v in variants}
    rows = [r for v in variants for r in scores[v].values()]
    paths = [ev / "images" / v / f"{r['id']}_{r['sample']}.png" for v in variants for r in scores[v].values()]
    for r in rows:
        r["critics"] = {}
    critic = reward.Critic(args.critic, batch_size=args.batch_size)
    print(f"{ev}: {kind}, {len(rows)} samples of {len(recs)} prompts ({', '.join(variants)}); critic {args.critic}")
    figures = {}
    runs = [(m, 1) for m in args.methods.split(",")] + [("generate", int(n)) for n in args.samples.split(",") if int(n) > 1]
    for method, samples in runs:
        name, t0, failed = method if samples == 1 else f"{method} x{samples}", time.perf_counter(), 0
        torch.manual_seed(args.seed)
        for s in range(0, len(rows), 64):
            chunk, ims = rows[s:s + 64], [load_image(p) for p in paths[s:s + 64]]
            rs = [recs[r["id"]] for r in chunk]
            sources = [load_image(r["image"], base_dir) for r in rs] if kind == "edit" else None
            rewards = [x for x, _ in policy_scores(critic, kind, rs, ims, sources, method, samples)]
            for r, x in zip(chunk, rewards):
                failed += x is None
                if x is not None:
                    r["critics"][name] = x
        rank = within_prompt_ranking(scores, name)
        figures[name] = {"spearman": rank["spearman"], "prompts": rank["prompts"], "all_tied": rank["all_tied"],
                         "tied_share": tied_share(scores, name), "failures": failed,
                         "seconds": time.perf_counter() - t0}
    print(f"\n{'method':<13} {'within-prompt Spearman':>23} {'one reward for all':>19} {'samples tied':>13} "
          f"{'failures':>9} {'seconds':>8}")
    for m, f in figures.items():
        print(f"{m:<13} {f['spearman']:>23.3f} {f['all_tied']:>12} of {f['prompts']:<4} {f['tied_share']:>13.2f} "
              f"{f['failures']:>9} {f['seconds']:>8.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main(get_args())
