"""The miniature world's data: what a real project collects, drawn here with exact ground truth.

    python -m toy world --out runs/mini/data          # 1. candidates to curate, bench splits, RL prompt sets
    python -m toy policy-candidates                    # 2. (after pretrain-gen / -edit) the tiny policies' own samples
    python curate.py --preset mini                     # 3. the curation stage judges the candidates (toy.oracle:teacher)
    python -m toy critic-base --data runs/mini/data    # 4. the seeing-stage records and the tiny critic base

1 writes under --out (every record carries `toy`, its ground truth: scene, out_scene, edit, ...):
  edit/candidates.jsonl {id, instruction, toy, source, edited} and gen/candidates.jsonl {id, prompt, difficulty,
  toy, image}, the pools curate.py judges, with images/ beside them; bench/edit_execution.jsonl,
  bench/edit_consistency.jsonl, bench/gen.jsonl, FIRM-Bench-like splits labelled with the ground truth
  ("human_score"), disjoint from the pools; rl/{edit,gen}_{train,test}.jsonl, the RL prompt sets; world.json.
2 appends the pre-trained tiny policies' own samples to both pools and the bench splits, marked "origin": "policy"
  (the simulated records carry no "origin"): the kind of image RL shows the critics, which the simulated editors
  and generators never draw. Their out_scene is read back from the pixels (toy.perception), as an MLLM teacher
  reads them, and a bench item's "human_score" is the rubric's on that reading; policy_candidates.json.
4 writes sft/vlm_{train,val}.jsonl (questions about the pools' images answered from the ground truth, the tiny
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

from PIL import Image

from common import append_jsonl, read_jsonl, read_jsonl_resumable, replace_dir, sample_seed, write_json, write_jsonl
from reward import IMAGE
from toy.models import build_tiny_critic
from toy.perception import read_back
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
# 2. python -m toy policy-candidates (after pretrain-gen / pretrain-edit, before curate.py)


def policy_candidates_args(ap):
    ap.add_argument("--data", default="runs/mini/data", help="the world's dataset directory (python -m toy world)")
    ap.add_argument("--gen-base", default="runs/mini/models/gen-base", help="the tiny generator (python -m toy pretrain-gen)")
    ap.add_argument("--edit-base", default="runs/mini/models/edit-base", help="the tiny editor (python -m toy pretrain-edit)")
    ap.add_argument("--gen", type=int, default=500, help="gen candidates drawn by the tiny generator")
    ap.add_argument("--edit", type=int, default=500, help="edit candidates made by the tiny editor")
    ap.add_argument("--bench-exec", type=int, default=100, help="policy items added to bench/edit_execution.jsonl")
    ap.add_argument("--bench-cons", type=int, default=100, help="policy items added to bench/edit_consistency.jsonl")
    ap.add_argument("--bench-gen", type=int, default=100, help="policy items added to bench/gen.jsonl")
    ap.add_argument("--gen-steps", type=int, default=10, help="sampler steps of the generator (rl_gen's rollout steps)")
    ap.add_argument("--edit-steps", type=int, default=6, help="sampler steps of the editor (rl_edit's rollout steps)")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels (the generator's are upsampled, bicubic)")
    ap.add_argument("--batch-size", type=int, default=16, help="samples per sampler call")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0)


def policy_prompt(kind, split, i, seed):
    """A fresh prompt of the world for the tiny policies: gen {id, prompt, difficulty}, edit {id, instruction}, with
    its ground truth in `toy`. Ids "pgen-" / "pedit-" never collide with the simulated candidates' ("gen-", "edit-")."""
    rng = random.Random(f"{seed}:p{kind}:{split}:{i}")
    src = random_scene(rng)
    if kind == "gen":
        return {"id": f"pgen-{split}-{i:06d}", "prompt": gen_prompt(src, rng),
                "difficulty": "easy" if len(src.objects) == 1 else "hard", "toy": {"scene": src.to_dict()}}
    edit = random_edit(rng, src)
    return {"id": f"pedit-{split}-{i:06d}", "instruction": instruction(src, edit, rng), "toy": {"scene": src.to_dict(), "edit": edit}}


def sample_policy(kind, policy, items, args):
    """The policy's images for `items` with the RL scripts' own samplers; the sample seeds depend on the ids only.
    Each image is read back (toy.perception) as the teacher would: its objects paired with the prompt's by likeness."""
    seeds = [sample_seed(args.seed, "policy", it["id"]) for it in items]
    if kind == "gen":
        from rl_gen import generate
        images = [im.resize((args.size, args.size), Image.BICUBIC) for im in  # as rl_gen --reward-image-size shows the critic
                  generate(policy, [it["prompt"] for it in items], seeds, args.gen_steps, batch_size=args.batch_size)]
    else:
        from rl_edit import edit
        sources = [render(Scene.from_dict(it["toy"]["scene"]), args.size) for it in items]
        images = edit(policy, sources, [it["instruction"] for it in items], seeds, args.edit_steps, args.batch_size)
    out = []
    for it, im in zip(items, images):
        src = Scene.from_dict(it["toy"]["scene"])
        seen, degrade = read_back(im, src, it["toy"]["edit"] if kind == "edit" else None)
        toy = dict(it["toy"], out_scene=seen.to_dict(), **{"generator" if kind == "gen" else "editor": "policy"}, degrade=degrade)
        out.append((dict(it, toy=toy, origin="policy"), seen, im))
    return out


def add_policy_samples(root, kind, split, n, policy, args, exclude=()):
    """Append n policy samples to a manifest (gen/ or edit/candidates.jsonl, or a bench split), PNGs beside it; ids
    already there are skipped (resume). A bench item's "human" score is the rubric's on the scene read back, and a
    bench draw whose prompt is in `exclude` (a training candidate's) is drawn again. Returns the prompts' keys."""
    manifest, mode = {"train": (f"{kind}/candidates.jsonl", None), "bench": ("bench/gen.jsonl", "instruction"),
                      "bench-execution": ("bench/edit_execution.jsonl", "execution"),
                      "bench-consistency": ("bench/edit_consistency.jsonl", "consistency")}[split]
    manifest = root / manifest
    done = {r["id"] for r in read_jsonl_resumable(manifest)}
    items, keys, i = [], set(), 0
    while len(keys) < n:
        it = policy_prompt(kind, split, i, args.seed)
        key = json.dumps([it["toy"]["scene"], it["toy"].get("edit")], sort_keys=True)
        if key not in exclude and key not in keys:
            keys.add(key)
            items += [it] if it["id"] not in done else []
        i += 1
    (manifest.parent / "images").mkdir(parents=True, exist_ok=True)
    for b in range(0, len(items), args.batch_size):
        for item, seen, im in sample_policy(kind, policy, items[b:b + args.batch_size], args):
            src = Scene.from_dict(item["toy"]["scene"])
            if kind == "gen":
                item["image"] = f"images/{item['id']}.png"
                im.save(manifest.parent / item["image"])
                score = instruction_score(src, seen)
            else:
                item.update(source=f"images/{item['id']}_src.png", edited=f"images/{item['id']}_out.png")
                render(src, args.size).save(manifest.parent / item["source"])
                im.save(manifest.parent / item["edited"])
                score = (consistency_score if mode == "consistency" else execution_score)(src, seen, item["toy"]["edit"])
            if mode:  # a bench item: the fields of the simulated ones (write_bench)
                item = {k: item[k] for k in ("id", "source", "edited", "instruction", "image", "prompt", "difficulty")
                        if k in item} | {"mode": mode, "human_score": score, "toy": item["toy"], "origin": "policy"}
            append_jsonl(manifest, item)
    print(f"{manifest}: {len(items)} policy samples added ({n - len(items)} there already)", flush=True)
    return keys


def build_policy_candidates(args):
    """The tiny policies' own samples beside the simulated candidates, in the pools curate.py judges and the bench:
    what RL shows the critics. The teacher reads them from their pixels (toy.perception), since no scene is known."""
    import torch
    from rl_edit import load_editor
    from rl_gen import load_generator
    torch.set_num_threads(args.threads)
    root = Path(args.data)
    for kind, load, n, bench in (("gen", lambda: load_generator(args.gen_base, device="cpu"), args.gen, {"bench": args.bench_gen}),
                                 ("edit", lambda: load_editor(args.edit_base, device="cpu"), args.edit,
                                  {"bench-execution": args.bench_exec, "bench-consistency": args.bench_cons})):
        if n + sum(bench.values()) == 0:  # e.g. --edit 0 --bench-exec 0 --bench-cons 0: the gen half alone
            continue
        policy = load()
        with torch.no_grad():
            train = add_policy_samples(root, kind, "train", n, policy, args)
            for split, m in bench.items():
                add_policy_samples(root, kind, split, m, policy, args, exclude=train)
    counts = {str(f.relative_to(root)): sum(r.get("origin") == "policy" for r in read_jsonl(f))
              for f in [root / "gen/candidates.jsonl", root / "edit/candidates.jsonl", *sorted((root / "bench").glob("*.jsonl"))]}
    write_json(root / "policy_candidates.json", {"args": vars(args), "policy_records": counts})
    print("policy samples: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


# -----------------------------------------------------------------------------
# 4. python -m toy critic-base (after curate.py)


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
