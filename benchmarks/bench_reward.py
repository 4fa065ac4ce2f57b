"""Critic throughput, side by side: one-at-a-time generation (how the release's transformers server scores),
batched generation, the digit-probability ("expected") mode, and the same critic served by `transformers serve`
(an OpenAI-compatible server, as vLLM is) with 1, 4 and 16 requests in flight; then the agreement (MAE) between
the fast mode and the generated score.

    python benchmarks/bench_reward.py                                        # tiny critic base (throughput only)
    python benchmarks/bench_reward.py --model runs/mini/models/edit-critic    # + MAE on the bench split
    python benchmarks/bench_reward.py --model /ckpt/FIRM-Edit-8B --data /data/firm-bench --n 64 \\
        --served http://critic-host:8000/v1#firm-edit                        # a vLLM server instead of transformers serve

The untrained critic base writes garbage until --max-new-tokens, so its generation figures are the
cost of full-length answers; a trained critic stops at its end-of-turn token (the mean answer length
is printed). The MAE part needs answers that parse: it is skipped for a critic that writes none.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from common import load_image, read_jsonl  # noqa: E402
from reward import Critic, open_critic  # noqa: E402
from served import Served  # noqa: E402  (tests/served.py: `transformers serve` on 127.0.0.1)


def get_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # what to measure
    ap.add_argument("--model", default=None, help="critic dir (default: runs/mini/models/edit-critic if it exists, else critic-base)")
    ap.add_argument("--data", default="runs/mini/data", help="curated dataset dir (its bench/ split is scored)")
    ap.add_argument("--mode", default="execution", choices=["execution", "consistency", "instruction"])
    ap.add_argument("--n", type=int, default=32, help="items per throughput measurement")
    ap.add_argument("--mae-n", type=int, default=0, help="bench items for the MAE part (0 = the whole split)")
    # settings
    ap.add_argument("--batch-size", type=int, default=16, help="in-process critic batch")
    ap.add_argument("--max-new-tokens", type=int, default=192, help="tokens per generated answer (the tiny edit critic writes up to ~140)")
    ap.add_argument("--in-flight", default="1,4,16", help="requests in flight to the served critic")
    ap.add_argument("--served", default=None, help="a served critic URL#name to measure instead of starting "
                    "`transformers serve` for --model on this machine")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    return ap.parse_args(argv)


def bench_items(args, n):
    path = Path(args.data) / "bench" / ({"execution": "edit_execution.jsonl", "consistency": "edit_consistency.jsonl"}.get(args.mode, "gen.jsonl"))
    rows, base = read_jsonl(path), path.parent
    rows = rows[:n] if n else rows
    if args.mode == "instruction":
        return rows, [{"image": load_image(r["image"], base), "prompt": r["prompt"]} for r in rows]
    return rows, [{"source": load_image(r["source"], base), "edited": load_image(r["edited"], base),
                   "instruction": r["instruction"]} for r in rows]


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main(args):
    torch.set_num_threads(args.threads)
    model = args.model or next(p for p in ("runs/mini/models/edit-critic", "runs/mini/models/critic-base") if Path(p).exists())
    critic = Critic(model, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    _, items = bench_items(args, args.n)
    tok = critic.processor.tokenizer
    print(f"critic {model} ({sum(p.numel() for p in critic.model.parameters()) / 1e6:.2f} M params, {critic.device}, "
          f"{critic.dtype}), mode {args.mode}, {len(items)} items, torch threads {args.threads}, max new tokens {args.max_new_tokens}")
    critic.score(args.mode, items[:2])  # warm-up

    rows = []
    critic.batch_size = 1
    js, dt = timed(lambda: critic.score(args.mode, items))
    rows.append(("one at a time, generate", dt, js))
    critic.batch_size = args.batch_size
    js, dt = timed(lambda: critic.score(args.mode, items))
    rows.append((f"batched ({args.batch_size}), generate", dt, js))
    gen_len = sum(len(tok.encode(j.text)) for j in js) / len(js)
    js, dt = timed(lambda: critic.score(args.mode, items, method="expected"))
    rows.append((f"batched ({args.batch_size}), expected", dt, js))
    server = None if args.served else Served(model, threads=args.threads)
    try:
        served = open_critic(args.served or server.spec, max_new_tokens=args.max_new_tokens)
        served.score(args.mode, items[:2])  # warm-up
        for k in map(int, args.in_flight.split(",")):
            served.concurrency = k
            js, dt = timed(lambda: served.score(args.mode, items))
            rows.append((f"served, {k} in flight", dt, js))
    finally:
        if server is not None:
            server.stop()

    base = len(items) / rows[0][1]
    print(f"\n{'scoring':<32} {'items/s':>9} {'x one-at-a-time':>16} {'parse failures':>15}")
    for name, dt, js in rows:
        print(f"{name:<32} {len(items) / dt:>9.2f} {len(items) / dt / base:>16.2f} {sum(not j.ok for j in js):>15}")
    print(f"mean generated answer: {gen_len:.1f} tokens; served by {args.served or 'transformers serve on this machine'}")

    # agreement of the fast mode with the generated score, on the bench split
    rows_, items = bench_items(args, args.mae_n)
    gen = critic.score(args.mode, items)
    exp = critic.score(args.mode, items, method="expected")
    critic.min_digit_mass = 0.0  # the raw expectation too, to show what a mass threshold hides
    raw = critic.score(args.mode, items, method="expected")
    pairs = [(g.scores[0], e.scores[0], r["human_score"]) for g, e, r in zip(gen, exp, rows_) if g.ok and e.ok]
    print(f"\nbench split: {len(items)} items; generated answers parsed {sum(g.ok for g in gen)}, expected mode "
          f"passed the digit-mass check {sum(e.ok for e in exp)} (mean digit mass "
          f"{sum(float(j.text.split('mass ')[1].rstrip(')')) for j in raw) / len(raw):.3f})")
    if not pairs:
        print("MAE: n/a (no item where both the generated answer parsed and the expected mode passed)")
        return
    mae = lambda xs: sum(abs(a - b) for a, b in xs) / len(xs)
    print(f"MAE over {len(pairs)} items: expected vs generated {mae([(g, e) for g, e, _ in pairs]):.3f} | "
          f"generated vs human {mae([(g, h) for g, _, h in pairs]):.3f} | expected vs human {mae([(e, h) for _, e, h in pairs]):.3f} | "
          f"round(expected) vs human {mae([(round(e), h) for _, e, h in pairs]):.3f}")
    print(json.dumps({"throughput_items_per_s": {n: round(len(rows[0][2]) / dt, 3) for n, dt, _ in rows}}))


if __name__ == "__main__":
    main(get_args())
