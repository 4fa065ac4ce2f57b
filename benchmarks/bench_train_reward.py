"""Critic SFT throughput and per-rank parameter memory, world size 1 vs 2 (FSDP2, gloo, CPU).

    python -m toy world --out runs/mini/data && python -m toy critic-base --data runs/mini/data --out runs/mini/models/critic-base
    python benchmarks/bench_train_reward.py            # ~1-2 min on 2 cores
    python benchmarks/bench_train_reward.py --model /ckpt/Qwen3-VL-2B-Instruct --train-file data/sft/edit_train.jsonl

Each world size runs `torchrun --nproc_per_node=W train_reward.py` on the same global batch, one
thread per rank, and reads the figures the run itself records: samples/s over the steps after the
first (start-up excluded) and the bytes of parameters each rank holds (FSDP2 shards: about 1/W of
the full model). Timings on a shared machine are noisy: compare runs made side by side.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(world, args, out):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", str(ROOT / "train_reward.py"),
           "--model", args.model, "--train-file", args.train_file, "--out", str(out), "--lr", "1e-4",
           "--max-steps", str(args.steps), "--global-batch", str(args.global_batch),
           "--micro-batch", str(args.global_batch // world), "--threads", str(args.threads),
           "--eval-every", "1000000", "--save-every", "1000000", "--val-generate", "0"]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"world {world} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    side = json.loads((out / "train_reward.json").read_text())
    # samples/s between the end of step 1 and the end of the last step (excludes start-up and step 1)
    sps = args.global_batch * (len(rows) - 1) / (rows[-1]["time"] - rows[0]["time"])
    return sps, side["param_bytes_per_rank"], side["param_bytes_full"], rows[-1]["loss"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/mini/models/critic-base", help="base model directory")
    ap.add_argument("--train-file", default="runs/mini/data/sft/edit_train.jsonl", help="SFT JSONL")
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    ap.add_argument("--global-batch", type=int, default=16, help="samples per step (all ranks)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--worlds", default="1,2", help="world sizes to compare")
    args = ap.parse_args()
    if not (ROOT / args.model / "config.json").is_file() and not Path(args.model, "config.json").is_file():
        sys.exit(f"{args.model}: no model directory; build it first: python -m toy critic-base --data runs/mini/data --out runs/mini/models/critic-base")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for w in (int(x) for x in args.worlds.split(",")):
            results[w] = run(w, args, Path(tmp) / f"w{w}")
    base = results[min(results)]
    print(f"critic SFT, {args.model}, global batch {args.global_batch}, {args.steps} steps, {args.threads} thread(s) per rank")
    print(f"{'world':>5} | {'samples/s':>9} | {'speed-up':>8} | {'params/rank MiB':>15} | {'full MiB':>8} | {'share':>5} | last loss")
    for w, (sps, per_rank, full, loss) in results.items():
        print(f"{w:>5} | {sps:>9.2f} | {sps / base[0]:>7.2f}x | {per_rank / 2**20:>15.2f} | {full / 2**20:>8.2f} | "
              f"{per_rank / full:>5.2f} | {loss:.4f}")


if __name__ == "__main__":
    main()
