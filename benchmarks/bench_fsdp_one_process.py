"""One process on the CPU, critic SFT steps side by side: the model as it is (what common.fsdp_shard leaves it as
there) and the same model under FSDP2's recipe (fully_shard per decoder layer, the vision tower, then the root).

    python -m toy world --out runs/mini/data && python -m toy critic-base --data runs/mini/data --out runs/mini/models/critic-base
    python benchmarks/bench_fsdp_one_process.py          # ~1 min on one core
    python benchmarks/bench_fsdp_one_process.py --model runs/mini/models/vlm-base --train-file runs/mini/data/sft/edit_train.jsonl

A world of one has nothing to shard, and on the CPU the mixed-precision policy is plain fp32, so both variants
compute the same numbers (the script checks that their losses agree bit for bit); FSDP2 adds its hooks (parameter
all-gathers and gradient reduce-scatters of a world of one) to every block's forward and backward. Both variants
run on the same pre-encoded batches (the data loading is left out), alternating step by step so that a change in the
machine's speed hits both alike.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]
from common import cleanup_dist, setup_dist  # noqa: E402
from train_reward import collate, encode, load_base, sft_step  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/mini/models/critic-base", help="critic model directory")
    ap.add_argument("--train-file", default="runs/mini/data/sft/edit_train.jsonl", help="SFT JSONL (its images beside it)")
    ap.add_argument("--steps", type=int, default=40, help="timed optimizer steps per variant (after 3 untimed ones)")
    ap.add_argument("--batch", type=int, default=4, help="samples per step (the mini presets' global batch)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args()
    for p in (args.model + "/config.json", args.train_file):
        if not Path(p).is_file():
            sys.exit(f"{p}: not found; build the world and the critic base first (see the docstring)")
    rank, world, device = setup_dist(args.threads)
    from torch.distributed.fsdp import fully_shard

    lines = Path(args.train_file).read_text().splitlines()
    n = args.batch * (args.steps + 3)
    if len(lines) < n:
        sys.exit(f"{args.train_file}: {len(lines)} records, the run needs {n}")
    records = [json.loads(line) for line in lines[:n]]
    variants = {}
    for name in ("as it is", "FSDP2, world of one"):
        torch.manual_seed(0)
        model, processor = load_base(args.model, rank)
        if name.startswith("FSDP2"):
            for block in [*model.model.language_model.layers, model.model.visual]:
                fully_shard(block)
            fully_shard(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        variants[name] = {"model": model, "opt": opt, "seconds": 0.0, "losses": []}
    pad = processor.tokenizer.pad_token_id
    root = Path(args.train_file).parent
    batches = [collate([encode(r, processor, root) for r in records[i:i + args.batch]], pad) for i in range(0, n, args.batch)]
    for i, batch in enumerate(batches):
        for v in variants.values():  # alternating: a slower stretch of the machine slows both
            t0 = time.perf_counter()
            v["losses"].append(sft_step(v["model"], [batch], world, device))
            torch.nn.utils.clip_grad_norm_(v["model"].parameters(), 1.0)
            v["opt"].step()
            v["opt"].zero_grad(set_to_none=True)
            v["seconds"] += (time.perf_counter() - t0) if i >= 3 else 0.0
    base = variants["as it is"]
    print(f"critic SFT on one CPU process, {args.model}, {args.batch} samples per step, {args.steps} timed steps, "
          f"{args.threads} thread(s)")
    print(f"{'variant':>20} | {'s/step':>7} | {'samples/s':>9} | {'vs as it is':>11} | losses equal")
    for name, v in variants.items():
        per_step = v["seconds"] / args.steps
        print(f"{name:>20} | {per_step:>7.3f} | {args.batch / per_step:>9.2f} | "
              f"{per_step / (base['seconds'] / args.steps):>10.2f}x | {v['losses'] == base['losses']}")
    cleanup_dist()


if __name__ == "__main__":
    main()
