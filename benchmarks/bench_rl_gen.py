"""rl_gen.py time split per RL step (rollout / reward / train) and peak memory per rank, 1 rank vs 2 ranks.

    python benchmarks/bench_rl_gen.py                      # tiny SD3 of the miniature world, pixel reward, CPU
    python benchmarks/bench_rl_gen.py --ranks 1 8 -- --model /ckpt/stable-diffusion-3.5-medium \\
        --prompts prompts.jsonl --reward-model http://critic-host:8000/v1#firm-gen --prompts-per-step 48 --group-size 16

Each setting runs rl_gen.py for --steps steps (the first is warm-up and is not averaged) in a fresh output
dir, with the same global batch: more ranks = fewer samples per rank. Memory is the peak per rank (CUDA:
max allocated; CPU: max resident set size, which includes the Python/torch runtime). Everything after
`--` goes to rl_gen.py unchanged. On CPU each rank gets --threads threads: 2 ranks use 2 cores.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def get_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="world sizes to compare")
    ap.add_argument("--steps", type=int, default=4, help="RL steps per setting (the first is warm-up)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads per rank")
    ap.add_argument("rl_args", nargs="*", help="arguments for rl_gen.py (after --)")
    return ap.parse_args(argv)


def tiny_setup(tmp):
    """The miniature world's generator and prompts (built in `tmp` if runs/mini has none)."""
    model, prompts = ROOT / "runs/mini/models/gen-base", ROOT / "runs/mini/data/rl/gen_train.jsonl"
    if not prompts.is_file():
        sys.exit("build the miniature data first: python -m toy world --out runs/mini/data && python curate.py --preset mini")
    if not (model / "model_index.json").is_file():
        model = Path(tmp) / "gen"
        subprocess.run([sys.executable, "-m", "toy", "pretrain-gen", "--out", str(model), "--steps", "20"], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
    return ["--preset", "mini", "--model", str(model), "--prompts", str(prompts), "--reward-model", "toy.judges:pixel",
            "--reward-image-size", "0"]


def run(world, rl_args, out, args):
    launcher = [sys.executable] if world == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     f"--nproc_per_node={world}"]
    cmd = launcher + [str(ROOT / "rl_gen.py"), *rl_args, "--out", str(out), "--steps", str(args.steps),
                      "--eval-every", "0", "--save-every", "1000000", "--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"rl_gen.py failed with {world} rank(s):\n{res.stderr[-3000:]}")
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    rows = rows[1:] or rows  # drop the warm-up step
    mean = lambda k: sum(r[k] for r in rows) / len(rows)
    return {k: mean(k) for k in ("t_rollout", "t_reward", "t_train", "mem_gb_max", "mem_gb_min", "reward")}


def main(args):
    with tempfile.TemporaryDirectory() as tmp:
        rl_args = args.rl_args or tiny_setup(tmp)
        print(f"rl_gen.py {' '.join(rl_args)}  ({args.steps} steps, first dropped; {args.threads} thread(s) per rank)")
        print(f"{'ranks':>5} | {'rollout s':>9} | {'reward s':>8} | {'train s':>7} | {'step s':>6} | {'peak mem GB/rank (min-max)':>26}")
        for world in args.ranks:
            m = run(world, rl_args, Path(tmp) / f"w{world}", args)
            step = m["t_rollout"] + m["t_reward"] + m["t_train"]
            print(f"{world:5d} | {m['t_rollout']:9.3f} | {m['t_reward']:8.3f} | {m['t_train']:7.3f} | {step:6.3f} | "
                  f"{m['mem_gb_min']:12.3f} - {m['mem_gb_max']:.3f}", flush=True)


if __name__ == "__main__":
    main(get_args())
