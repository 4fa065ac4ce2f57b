"""Does scoring beside the rollout pay? rl_gen.py with a served critic, each rollout batch scored while the next one
samples (--reward-overlap) vs all samples scored after the rollout (--no-reward-overlap), side by side.

    python benchmarks/bench_overlap.py                    # runs/mini: tiny generator + tiny gen critic, on this machine
    python benchmarks/bench_overlap.py --critic-dir DIR --model GEN_DIR --prompts PROMPTS.jsonl

The critic is served by `transformers serve` on 127.0.0.1 (tests/served.py), in its own process with one thread,
and rl_gen.py runs with one thread: on a 2-core machine each has a core, as a critic on its own GPUs would.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from served import Served  # noqa: E402


def get_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--critic-dir", default="runs/mini/models/gen-critic", help="critic to serve")
    ap.add_argument("--model", default="runs/mini/models/gen-base", help="generator (diffusers SD3 directory)")
    ap.add_argument("--prompts", default="runs/mini/data/rl/gen_train.jsonl")
    ap.add_argument("--steps", type=int, default=4, help="RL steps per setting (the first is warm-up)")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="critic answer limit")
    ap.add_argument("--rollout-batch", type=int, default=4, help="samples per rollout batch (the unit scored early)")
    return ap.parse_args(argv)


def run(spec, overlap, out, args):
    cmd = [sys.executable, str(ROOT / "rl_gen.py"), "--preset", "mini", "--model", args.model, "--prompts", args.prompts,
           "--test-prompts", args.prompts,
           "--reward", "qma", "--reward-model", spec, "--reward-max-new-tokens", str(args.max_new_tokens),
           "--rollout-batch", str(args.rollout_batch), "--out", str(out), "--steps", str(args.steps),
           "--eval-every", "0", "--save-every", "1000000", "--threads", "1",
           "--reward-overlap" if overlap else "--no-reward-overlap"]
    res = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"rl_gen.py failed:\n{res.stderr[-3000:]}")
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")][1:]  # drop the warm-up step
    return {k: sum(r[k] for r in rows) / len(rows) for k in ("t_rollout", "t_reward", "t_train")}


def main(args):
    server = Served(args.critic_dir)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            print(f"critic {args.critic_dir} served at {server.url}; generator {args.model}; {args.steps} steps "
                  f"(first dropped), rollout batches of {args.rollout_batch}, answers <= {args.max_new_tokens} tokens")
            print(f"{'scoring':<28} | {'rollout s':>9} | {'reward wait s':>13} | {'train s':>7} | {'step s':>6}")
            for overlap in (False, True):
                m = run(server.spec, overlap, Path(tmp) / str(overlap), args)
                name = "beside the rollout" if overlap else "after the rollout"
                print(f"{name:<28} | {m['t_rollout']:9.3f} | {m['t_reward']:13.3f} | {m['t_train']:7.3f} | "
                      f"{sum(m.values()):6.3f}", flush=True)
    finally:
        server.stop()


if __name__ == "__main__":
    main(get_args())
