"""The miniature world's data: what a real project collects, drawn here with exact ground truth.

    python -m toy world --out runs/mini/data          # 1. candidates to curate, bench splits, RL prompt sets
    python curate.py --preset mini                     # 2. the curation stage judges the candidates (toy.oracle:teacher)
    python -m toy critic-base --data runs/mini/data    # 3. the seeing-stage records and the tiny critic base

1 writes under --out (every record carries `toy`, its ground truth: scene, out_scene, edit, ...):
  edit/candidates.jsonl {id, instruction, toy, source, edited} and gen/candidates.jsonl {id, prompt, difficulty,
  toy, image}, the pools curate.py judges, with images/ beside them; bench/edit_execution.jsonl,
  bench/edit_consistency.jsonl, bench/gen.jsonl, FIRM-Bench-like splits labelled with the ground truth
  ("human_score"), disjoint from the pools; rl/{edit,gen}_{train,test}.jsonl, the RL prompt sets; world.json.
3 writes sft/vlm_{train,val}.jsonl (questions about the pools' images answered from the ground truth, the tiny
  critic's first lesson: train_reward.py --preset mini-vlm) and the tiny critic base (models.build_tiny_critic).

Score balancing (Sec 3.1) happens here, where the ground truth is: --balance-share of the edit pool gets the
instruction of another edit of the same source, with that edit as its ground truth, so the teacher judges it
(low execution scores, still judged, never assumed). curate.py's own balancing, which can only borrow another
record's instruction, is switched off by its mini preset.
"""

import json
import random
import shutil
import zlib
from pathlib import Path

from common import read_jsonl, replace_dir, write_json, write_jsonl
from reward import IMAGE
from toy.models import build_tiny_critic
from toy.rubrics import consistency_score, execution_score, instruction_score, simulate_editor, simulate_generator
from toy.world import (COLORS, EDIT_OPS, SHAPES, Scene, apply_edit, cell_name, change_phrase, describe, gen_prompt,
                       instruction, random_edit, random_scene, render, request_summary, scene_changes)

# -----------------------------------------------------------------------------
# candidates of the miniature world (deterministic per index: a rerun makes the same items)

EDITOR_WEIGHTS = {"perfect": 0.15, "partial": 0.2, "wrong_object": 0.15, "no_op": 0.12, "extra_changes": 0.18,
                  "degraded": 0.08, "different": 0.12}


def edit_candidate(split, i, args, rng=None):
    rng = rng or random.Random(f"{args.seed}:edit:{split}:{i}")
    src = random_scene(rng)
    edit = random_edit(rng, src, rng.choice(args.edit_ops.split(",")))
    editor = rng.choices(list(EDITOR_WEIGHTS), weights=list(EDITOR_WEIGHTS.values()))[0]
    out, degrade = simulate_editor(rng, src, edit, editor)
    item = {"id": f"edit-{split}-{i:06d}", "instruction": instruction(src, edit, rng),
            "toy": {"scene": src.to_dict(), "out_scene": out.to_dict(), "edit": edit, "editor": editor, "degrade": degrade}}
    if split == "train" and rng.random() < args.balance_share:
        item = balance(item, rng)
    return item, src, out, degrade


def balance(item, rng):
    """Score balancing (Sec 3.1): rewrite the instruction to a different edit of the same source."""
    src = Scene.from_dict(item["toy"]["scene"])
    old = item["toy"]["edit"]
    for _ in range(20):
        new = random_edit(rng, src)
        if new["op"] != old["op"] or new.get("target") != old.get("target"):
            break
    t = dict(item["toy"], edit=new, balanced=True)
    return dict(item, instruction=instruction(src, new, rng), toy=t)


GEN_WEIGHTS = {"correct": 0.3, "missing_object": 0.15, "wrong_attribute": 0.2, "wrong_details": 0.2, "irrelevant": 0.15}


def gen_candidate(split, i, args, rng=None):
    rng = rng or random.Random(f"{args.seed}:gen:{split}:{i}")
    want = random_scene(rng)
    generator = rng.choices(list(GEN_WEIGHTS), weights=list(GEN_WEIGHTS.values()))[0]
    got, degrade = simulate_generator(rng, want, generator)
    item = {"id": f"gen-{split}-{i:06d}", "prompt": gen_prompt(want, rng),
            "difficulty": "easy" if len(want.objects) == 1 else "hard",
            "toy": {"scene": want.to_dict(), "out_scene": got.to_dict(), "generator": generator, "degrade": degrade}}
    return item, got, degrade


def noise_seed(item_id):
    """The seed of an image's degradation noise: a function of its id only (Python's hash() of a str changes
    from process to process, which made two runs of the pipeline draw different noise)."""
    return zlib.crc32(item_id.encode())


def write_edit_images(root, item, src, out, degrade, size):
    """Images are written next to the manifest, named by id; existing files are kept (resume)."""
    paths = {"source": f"images/{item['id']}_src.png", "edited": f"images/{item['id']}_out.png"}
    for key, scene, deg in (("source", src, None), ("edited", out, degrade)):
        p = root / paths[key]
        if not p.exists():
            render(scene, size, deg, seed=noise_seed(item["id"])).save(p)
    return dict(item, **paths)


def write_gen_image(root, item, got, degrade, size):
    path = f"images/{item['id']}.png"
    if not (root / path).exists():
        render(got, size, degrade, seed=noise_seed(item["id"])).save(root / path)
    return dict(item, image=path)


# -----------------------------------------------------------------------------
# bench splits and RL prompt sets


def write_bench(args, root, train_keys):
    """FIRM-Bench-like splits labelled with ground truth ("human" scores), disjoint from training."""
    def items(kind, n, mode):
        rows, i = [], 0
        while len(rows) < n:
            if kind == "edit":
                item, src, out, deg = edit_candidate(f"bench-{mode}", i, args)
                key = json.dumps(item["toy"], sort_keys=True)
                if key not in train_keys:
                    item = write_edit_images(root / "bench", item, src, out, deg, args.size)
                    score = (execution_score if mode == "execution" else consistency_score)(src, out, item["toy"]["edit"])
                    rows.append({k: item[k] for k in ("id", "source", "edited", "instruction")} | {"mode": mode, "human_score": score, "toy": item["toy"]})
            else:
                item, got, deg = gen_candidate("bench", i, args)
                if json.dumps(item["toy"], sort_keys=True) not in train_keys:
                    item = write_gen_image(root / "bench", item, got, deg, args.size)
                    score = instruction_score(Scene.from_dict(item["toy"]["scene"]), got)
                    rows.append({k: item[k] for k in ("id", "image", "prompt", "difficulty")} | {"mode": "instruction", "human_score": score, "toy": item["toy"]})
            i += 1
        return rows
    write_jsonl(root / "bench" / "edit_execution.jsonl", items("edit", args.bench_exec, "execution"))
    write_jsonl(root / "bench" / "edit_consistency.jsonl", items("edit", args.bench_cons, "consistency"))
    write_jsonl(root / "bench" / "gen.jsonl", items("gen", args.bench_gen, "instruction"))


def write_rl(args, root):
    """RL prompt sets: edit {id, prompt, image, requirement} with the target scene for the pixel judge; gen {id, prompt}."""
    for split, n in (("train", args.rl_train), ("test", args.rl_test)):
        edits, gens = [], []
        for i in range(n):
            rng = random.Random(f"{args.seed}:rl-edit:{split}:{i}")
            src = random_scene(rng)
            edit = random_edit(rng, src)
            path = f"images/edit-{split}-{i:05d}.png"
            if not (root / "rl" / path).exists():
                render(src, args.size).save(root / "rl" / path)
            edits.append({"id": f"rl-edit-{split}-{i:05d}", "prompt": instruction(src, edit, rng), "image": path,
                          "requirement": None, "toy": {"scene": src.to_dict(), "edit": edit,
                                                      "target_scene": apply_edit(src, edit).to_dict()}})
            rng = random.Random(f"{args.seed}:rl-gen:{split}:{i}")
            want = random_scene(rng)
            gens.append({"id": f"rl-gen-{split}-{i:05d}", "prompt": gen_prompt(want, rng), "toy": {"scene": want.to_dict()}})
        write_jsonl(root / "rl" / f"edit_{split}.jsonl", edits)
        write_jsonl(root / "rl" / f"gen_{split}.jsonl", gens)


# -----------------------------------------------------------------------------
# seeing before judging


def vlm_records(rows, kind, image_prefix, seed):
    """Seeing before judging (miniature world only): questions about the SFT pool's images answered from the
    ground-truth scenes. A randomly initialised tiny VLM first learns to describe an image and a change here
    (train_reward.py --preset mini-vlm), then learns to judge; a real Qwen3-VL base already can.
    Edit candidates: describe both images; what changed; what the instruction asks (reading the instruction is
    learned no faster than seeing). Gen candidates: describe; where is / is there."""
    out = []
    for r in rows:
        rng = random.Random(f"{seed}:vlm:{r['id']}")
        rec = lambda tag, images, q, a: {"id": f"{r['id']}:{tag}", "mode": "describe", "images": images,  # text, then images
                                         "messages": [{"role": "user", "content": q if IMAGE in q else q + "\n" + IMAGE * len(images)},
                                                      {"role": "assistant", "content": a}]}
        after = Scene.from_dict(r["toy"]["out_scene"])
        if kind == "edit":
            before, images = Scene.from_dict(r["toy"]["scene"]), [image_prefix + r["source"], image_prefix + r["edited"]]
            out.append(rec("describe", images, "Describe both images.",
                           f"Image 1: {describe(before)}. Image 2: {describe(after)}."))
            changes = [change_phrase(before, after, c) for c in scene_changes(before, after)]
            out.append(rec("changes", images, "What changed from image 1 to image 2?", "; ".join(changes or ["nothing"]) + "."))
            out.append(rec("asked", images, f"Instruction: {r['instruction']}\n{IMAGE * 2}What is asked?",
                           request_summary(before, r["toy"]["edit"]) + "."))
        else:
            images = [image_prefix + r["image"]]
            out.append(rec("describe", images, "Describe the image.", describe(after) + "."))
            if after.objects and rng.random() < 0.5:
                o = rng.choice(after.objects)
                out.append(rec("where", images, f"Where is the {o.name}?", f"At the {cell_name(o.col, o.row)}."))
            else:
                color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
                there = any(o.color == color and o.shape == shape for o in after.objects)
                out.append(rec("is-there", images, f"Is there a {color} {shape}?", "Yes." if there else "No."))
    return out


# -----------------------------------------------------------------------------
# 1. python -m toy world


def world_args(ap):
    ap.add_argument("--out", default="runs/mini/data", help="dataset directory")
    ap.add_argument("--edit-train", type=int, default=3000, help="edit candidates to curate (each gives 2 SFT records)")
    ap.add_argument("--gen-train", type=int, default=2000, help="gen candidates to curate (each gives 2 SFT records)")
    ap.add_argument("--bench-exec", type=int, default=301, help="FIRM-Bench sizes: edit execution items")
    ap.add_argument("--bench-cons", type=int, default=256, help="edit consistency items")
    ap.add_argument("--bench-gen", type=int, default=250, help="gen items (easy = 1 object, hard = 2)")
    ap.add_argument("--rl-train", type=int, default=64, help="RL prompts (edit and gen each)")
    ap.add_argument("--rl-test", type=int, default=32, help="held-out RL prompts for policy evaluation")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--edit-ops", default=",".join(EDIT_OPS), help="comma-separated edit operations of the world")
    ap.add_argument("--balance-share", type=float, default=0.1,
                    help="share of edit candidates whose instruction is another edit's (score balancing, Sec 3.1)")
    ap.add_argument("--seed", type=int, default=0)


def build_world(args):
    """The candidate pools, the bench splits and the RL prompt sets; images already on disk are kept (a rerun
    after a kill makes the same items and continues)."""
    root = Path(args.out)
    for d in ("edit/images", "gen/images", "bench/images", "rl/images"):
        (root / d).mkdir(parents=True, exist_ok=True)
    edit_items = [write_edit_images(root / "edit", *edit_candidate("train", i, args), args.size) for i in range(args.edit_train)]
    gen_items = [write_gen_image(root / "gen", *gen_candidate("train", i, args), args.size) for i in range(args.gen_train)]
    write_jsonl(root / "edit" / "candidates.jsonl", edit_items)
    write_jsonl(root / "gen" / "candidates.jsonl", gen_items)
    write_bench(args, root, {json.dumps(it["toy"], sort_keys=True) for it in edit_items + gen_items})
    write_rl(args, root)
    counts = {f"{d}/{f.stem}": len(read_jsonl(f)) for d in ("edit", "gen", "bench", "rl") for f in sorted((root / d).glob("*.jsonl"))}
    write_json(root / "world.json", {"args": vars(args), "records": counts})
    print(f"wrote the miniature world to {root}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


# -----------------------------------------------------------------------------
# 3. python -m toy critic-base (after curate.py)


def critic_base_args(ap):
    ap.add_argument("--data", default="runs/mini/data", help="the dataset directory, curated (curate.py --preset mini)")
    ap.add_argument("--out", default="runs/mini/models/critic-base", help="the tiny critic base's model directory")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--vision-steps", type=int, default=2000,
                    help="steps pre-training the tiny critic's vision tower on the world (models.pretrain_vision)")
    ap.add_argument("--seed", type=int, default=0)


def write_vlm(root, seed):
    """sft/vlm_{train,val}.jsonl from the curated pools, holding out the candidates that curate.py held out of the
    critics' SFT split (sft/{edit,gen}_val.jsonl): no validation image is seen while learning to see."""
    train, val = [], []
    for kind in ("edit", "gen"):
        rows = read_jsonl(root / kind / "curated.jsonl")
        held_out = {r["id"].rsplit(":", 1)[0] for r in read_jsonl(root / "sft" / f"{kind}_val.jsonl")}
        for r in vlm_records(rows, kind, f"../{kind}/", seed):  # image paths relative to sft/
            (val if r["id"].rsplit(":", 1)[0] in held_out else train).append(r)
    random.Random(seed).shuffle(train)
    write_jsonl(root / "sft" / "vlm_train.jsonl", train)
    write_jsonl(root / "sft" / "vlm_val.jsonl", val)
    print(f"wrote {len(train)} + {len(val)} seeing-stage records to {root / 'sft'}/vlm_{{train,val}}.jsonl")


def build_critic_base(args):
    """The seeing-stage records, then the tiny Qwen3-VL critic base, its tokenizer trained on every SFT text
    (prompts and answers). Built under a temporary name and renamed when complete: a killed build is built again,
    never taken for a finished one."""
    root, out = Path(args.data), Path(args.out)
    write_vlm(root, args.seed)
    if (out / "config.json").exists():
        print(f"kept the critic base at {out}")
        return
    texts = []
    for f in sorted((root / "sft").glob("*.jsonl")):
        texts += [m["content"] for r in read_jsonl(f) for m in r["messages"]]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    n = build_tiny_critic(tmp, texts, image_size=args.size, vision_steps=args.vision_steps, seed=args.seed)
    replace_dir(tmp, out)
    print(f"built tiny critic base ({n / 1e6:.2f} M params, Qwen3VLForConditionalGeneration, vision tower pre-trained "
          f"{args.vision_steps} steps) at {out}")
