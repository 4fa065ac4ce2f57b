"""Pre-training the tiny policies by flow matching, so that RL starts from policies that already draw the world.

    python -m toy pretrain-gen       # the tiny SD3 generator -> runs/mini/models/gen-base
    python -m toy pretrain-edit      # the tiny Qwen-Image editor -> runs/mini/models/edit-base
"""

import json
import math
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

import rl_edit
import rl_gen
from common import image_grid, pil_to_tensor, replace_dir, seed_everything
from toy.judges import pixel_judge_edit
from toy.models import EDIT_RESOLUTION, GEN_SIZE, build_tiny_editor, build_tiny_generator
from toy.world import edit_triple, gen_prompt, random_scene, render

# -----------------------------------------------------------------------------
# the tiny generation policy (SD3)


def pretrain_gen_args(ap):
    ap.add_argument("--out", default="runs/mini/models/gen-base", help="diffusers directory to write")
    ap.add_argument("--steps", type=int, default=1500, help="flow-matching steps (~0.1-0.3 s each on one CPU thread)")
    ap.add_argument("--batch-size", type=int, default=32, help="images per step")
    ap.add_argument("--lr", type=float, default=3e-3, help="AdamW peak learning rate (cosine decay to 0)")
    ap.add_argument("--size", type=int, default=GEN_SIZE, help="image side in pixels")
    ap.add_argument("--freeze-text-encoders", action="store_true", help="train the transformer only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")


def pretrain_gen(args):
    """Build the tiny generator and pre-train it by rectified-flow matching on rendered scenes.

    The tiny CLIP encoders are trained too (random frozen ones carry the prompt poorly); RL freezes them."""
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    # built and trained in <out>.tmp, renamed at the end: a killed run never leaves an untrained generator at --out
    out, tmp = Path(args.out), Path(str(args.out) + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    n = build_tiny_generator(str(tmp), size=args.size, seed=args.seed)
    gen = rl_gen.load_generator(tmp, device="cpu")
    modules = [gen.transformer] + ([] if args.freeze_text_encoders else [gen.pipe.text_encoder, gen.pipe.text_encoder_2])
    params = [p for m in modules for p in m.requires_grad_(True).train().parameters()]  # load_generator froze them
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / args.steps, 1.0))))
    rng = random.Random(f"{args.seed}:pretrain-gen")
    print(f"tiny SD3 generator: {n / 1e6:.2f} M transformer parameters, {args.steps} steps x {args.batch_size} images")
    t0, avg = time.time(), None
    for step in range(1, args.steps + 1):
        scenes = [random_scene(rng) for _ in range(args.batch_size)]
        x0 = torch.stack([pil_to_tensor(render(s, args.size)) for s in scenes])
        emb, pooled = rl_gen.encode_prompts(gen, [gen_prompt(s, rng) for s in scenes])
        t = torch.rand(args.batch_size)
        eps = torch.randn_like(x0)
        x_t = rl_gen.rectified_flow_interp(x0, eps, t)
        v = rl_gen.velocity(gen.transformer, x_t, t, emb, pooled, gen.compute_dtype)
        loss = ((v - (eps - x0)) ** 2).mean()  # flow matching: the velocity of x_t = (1-t) x0 + t eps is eps - x0
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        avg = loss.item() if avg is None else 0.95 * avg + 0.05 * loss.item()
        if step % 50 == 0 or step == args.steps:
            print(f"step {step:5d} | loss {avg:.4f} | {time.time() - t0:.0f} s", flush=True)
    for name, m in zip(("transformer", "text_encoder", "text_encoder_2"), modules):
        m.eval().save_pretrained(tmp / name)
    replace_dir(tmp, out)
    print(f"wrote {out} ({time.time() - t0:.0f} s)")


# -----------------------------------------------------------------------------
# the tiny editing policy (Qwen-Image-Edit)


def judge_editor(editor, triples, steps=6, seed=0, size=64):
    """Mean pixel_judge_edit of the editor's results (upsampled to `size`) on (src, edit, target, instruction)s."""
    outs = rl_edit.edit(editor, [render(t[0], size) for t in triples], [t[3] for t in triples],
                        [seed + i for i in range(len(triples))], steps=steps)
    js = [pixel_judge_edit(o, t[0], t[2]) for o, t in zip(outs, triples)]
    return {k: float(np.mean([j[k] for j in js])) for k in js[0]}, outs



def pretrain_edit_args(ap):
    ap.add_argument("--out", default="runs/mini/models/edit-base", help="output diffusers directory")
    ap.add_argument("--steps", type=int, default=500, help="optimizer steps (~0.26 s each on an idle core)")
    ap.add_argument("--seconds", type=float, default=None, help="stop earlier after this many wall-clock seconds")
    ap.add_argument("--batch", type=int, default=32, help="(source, instruction, target) triples per step")
    ap.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate")
    ap.add_argument("--layers", type=int, default=3, help="transformer blocks")
    ap.add_argument("--heads", type=int, default=3, help="attention heads")
    ap.add_argument("--head-dim", type=int, default=32, help="channels per head")
    ap.add_argument("--s2d", type=int, default=2, help="pixels per latent cell along a side (space-to-depth, no VAE)")
    ap.add_argument("--eval", type=int, default=64, help="held-out triples for the pixel judge at the end")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0)


def pretrain_edit(args):
    """Flow matching on (source, instruction, target) triples: v = eps - x0 for the target x0 given the source."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(f"pretrain-edit:{args.seed}")
    # the tokenizer learns the edit chat template too, so its system turn is 64 tokens (as Qwen's), not 217 bytes
    texts = [edit_triple(rng)[3] for _ in range(3000)] + [rl_edit.SYSTEM_PREFIX + rl_edit.USER_TURN] * 100
    # built and trained in <out>.tmp, renamed at the end: a killed run never leaves a random editor at --out
    out, tmp = Path(args.out), Path(str(args.out) + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    n = build_tiny_editor(str(tmp), texts, layers=args.layers, heads=args.heads, head_dim=args.head_dim, s2d=args.s2d, seed=args.seed)
    editor = rl_edit.load_editor(tmp, device="cpu")
    tr = editor.transformer.train()
    print(f"tiny editor: {n / 1e6:.2f} M transformer parameters, {EDIT_RESOLUTION} px, {args.batch} triples/step, "
          f"{args.steps} steps")
    held_out = [edit_triple(random.Random(f"edit-eval:{i}")) for i in range(args.eval)]
    opt = torch.optim.AdamW(tr.parameters(), lr=args.lr, weight_decay=0.0)
    t0, step, losses = time.time(), 0, []
    while step < args.steps and (args.seconds is None or time.time() - t0 < args.seconds):
        batch = [edit_triple(rng) for _ in range(args.batch)]
        srcs = [render(b[0], 64) for b in batch]
        _, src, (h, w) = rl_edit.prepare_sources(editor, srcs)
        _, x0, _ = rl_edit.prepare_sources(editor, [render(b[2], 64) for b in batch])
        embeds, mask = rl_edit.encode_prompt(editor, [b[3] for b in batch], srcs)
        t, eps = torch.rand(len(batch)), torch.randn_like(x0)
        x_t = rl_gen.rectified_flow_interp(x0, eps, t)
        v = rl_edit.predict_velocity(tr, x_t, src, t, embeds, mask, (h // 2, w // 2))
        loss = torch.nn.functional.mse_loss(v, eps - x0)  # the velocity target of rectified flow
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tr.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % 50 == 0:
            print(f"step {step:5d} | loss {np.mean(losses[-50:]):.4f} | {time.time() - t0:.0f} s", flush=True)
    tr.eval()
    tr.save_pretrained(tmp / "transformer")
    with torch.no_grad():
        judged, outs = judge_editor(editor, held_out)
    noop = {k: float(np.mean([pixel_judge_edit(render(t[0], 64), t[0], t[2])[k] for t in held_out])) for k in judged}
    print(f"pre-trained {step} steps in {time.time() - t0:.0f} s; pixel judge on {len(held_out)} held-out edits: "
          f"edited {judged['edited']:.3f} kept {judged['kept']:.3f} overall {judged['overall']:.3f} "
          f"(returning the source unchanged: edited {noop['edited']:.3f} kept {noop['kept']:.3f} overall {noop['overall']:.3f})")
    rows = [[render(t[0], 64), o, render(t[2], 64)] for t, o in zip(held_out[:8], outs)]
    image_grid(rows).save(tmp / "pretrain_edits.png")
    with open(tmp / "pretrain_edit.json", "w") as f:
        json.dump({"args": vars(args), "steps": step, "final_loss": float(np.mean(losses[-50:])), "pixel_judge": judged,
                   "noop_pixel_judge": noop}, f, indent=2)
    replace_dir(tmp, out)
    print(f"wrote {out} (pretrain_edits.png: source | edit | target)")

