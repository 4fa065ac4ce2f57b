"""Data curation for FIRM critics (Sec 3.1-3.2): difference-first for edits, plan-then-score for generation.

Edit pipeline, per (source, edited, instruction) candidate:
  1. the judge describes the differences first, in two passes: the obvious change, then a
     detailed comparison by quantity, shape, texture/colour and position/layout;
  2. given both images, the difference report and the instruction, it scores EXECUTION and
     CONSISTENCY (1-5 each) as {"reasoning": ..., "score": [n]};
  3. score balancing: a share of instructions is rewritten so that they no longer match the
     edited image, giving the rare low execution scores (still judged, never assumed).
Generation pipeline, per (image, prompt) candidate:
  1. the judge writes a checklist ("analysis plan") from the prompt alone;
  2. it scores the image item by item against the plan, ending in \\boxed{n} (INSTRUCTION
     FOLLOWING), and rates aesthetics / technical quality / structure (QUALITY, for QMA).
The critic SFT files keep the judge's answer as the target but use the plain scoring prompt
WITHOUT the report or plan (Sec 4.1), so the critic learns to judge directly. In the miniature world
curate.py also writes sft/vlm_{train,val}.jsonl: questions about the same images answered from the
ground truth (describe, what changed, what is asked), on which the tiny critic base (random language
model, vision tower pre-trained on the world's scenes: --critic-vision-steps) first learns to see
(train_reward.py --task vlm); a real Qwen3-VL base needs no such step.

Judges (--judge): "oracle" (the miniature world's, knows the scenes; default), or a model named as every
script names a critic (reward.open_critic): a local model directory run in process (e.g. Qwen3-VL-8B-Instruct),
or an OpenAI-compatible endpoint such as a vLLM server, http://host:port/v1[#served model name].

    python curate.py                                   # miniature world -> runs/mini/data (~3 min, most of it the critic's vision tower)
    python curate.py --judge /ckpt/Qwen3-VL-8B-Instruct --edit-candidates my_edits.jsonl --gen-candidates my_gens.jsonl \\
        --out data/
    python curate.py --judge http://judge-host:8000/v1#qwen3-vl-235b --edit-candidates my_edits.jsonl --out data/

Departures from the paper:
  1. Candidates of the miniature world come from simulated editors/generators (toy.py), not from
     real models; on real data, candidates are read from a manifest you provide.
  2. Balancing rewrites an instruction by sampling a different edit of the same source (miniature
     world) or by taking another record's instruction (real data), not by asking an LLM.
  3. `--ablation-direct` also writes SFT files judged WITHOUT report/plan (the paper's argument,
     testable here: does the curated critic beat one trained on directly judged labels?).
  4. The miniature oracle's edit answers first describe both images, then list the changes it sees
     ("Image 1: ... Image 2: ... Changes: ..."), then judge them: a 1 M-parameter critic learns to look
     before it learns to judge, and describes one image far more reliably than it compares two.
"""

import argparse
import collections
import json
import os
import random
import shutil
import sys
import time
import zlib
from pathlib import Path

from tqdm import tqdm

import toy
from common import (append_jsonl, load_image, read_jsonl, read_jsonl_resumable, read_manifest, replace_dir,
                    run_stage, write_json, write_jsonl)
from reward import EDIT_MODES, GEN_MODES, IMAGE, N_SCORES, build_prompt, open_critic, parse_score

# -----------------------------------------------------------------------------
# CLI

def get_args(argv=None):
    ap = argparse.ArgumentParser(description="FIRM data curation", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", default="runs/mini/data", help="output dataset directory")
    # judge
    ap.add_argument("--judge", default="oracle", help="'oracle' (the miniature world's teacher) or a model judge: a "
                    "model directory (run in process) or an OpenAI-compatible endpoint http://host:port/v1[#served "
                    "name] (vLLM, ...; key from $FIRM_CRITIC_API_KEY), as reward.open_critic takes them")
    ap.add_argument("--judge-noise", type=float, default=0.15, help="oracle only: how often the teacher misses things (0 = perfect)")
    ap.add_argument("--max-new-tokens", type=int, default=512, help="model judges: tokens per answer")
    # real data
    ap.add_argument("--edit-candidates", default=None, help="JSONL {id, source, edited, instruction[, requirement]} (real data)")
    ap.add_argument("--gen-candidates", default=None, help="JSONL {id, image, prompt} (real data)")
    # miniature world sizes
    ap.add_argument("--edit-train", type=int, default=3000, help="edit candidates for SFT (each gives 2 records)")
    ap.add_argument("--gen-train", type=int, default=2000, help="gen candidates for SFT (each gives 2 records)")
    ap.add_argument("--bench-exec", type=int, default=301, help="FIRM-Bench sizes: edit execution items")
    ap.add_argument("--bench-cons", type=int, default=256, help="edit consistency items")
    ap.add_argument("--bench-gen", type=int, default=250, help="gen items (easy = 1 object, hard = 2)")
    ap.add_argument("--rl-train", type=int, default=64, help="RL prompts (edit and gen each)")
    ap.add_argument("--rl-test", type=int, default=32, help="held-out RL prompts for policy evaluation")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--edit-ops", default=",".join(toy.EDIT_OPS), help="comma-separated edit operations of the world")
    ap.add_argument("--critic-vision-steps", type=int, default=2000,
                    help="steps pre-training the tiny critic's vision tower on the world (toy.pretrain_vision)")
    # curation settings
    ap.add_argument("--balance-share", type=float, default=0.1, help="share of edit instructions rewritten to not match (Sec 3.1)")
    ap.add_argument("--val-share", type=float, default=0.05, help="share of SFT records held out for eval loss")
    ap.add_argument("--ablation-direct", type=int, default=1, help="also judge without report/plan (ablation SFT files)")
    ap.add_argument("--max-items", type=int, default=None, help="stop after judging this many new items (staged runs)")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


# -----------------------------------------------------------------------------
# judges. Each one answers the pipeline's four questions with TEXT; curate.py parses the text, so
# the oracle's answers go through exactly the parser a model's answers go through.

DIFF_PROMPTS = (
    "Image 1 is the original, image 2 the edited version. Describe the most obvious change between them.",
    "Compare the two images in detail: quantity of objects, shape, texture and colour, position and layout. "
    "List every difference, however small.",
)
PLAN_PROMPT = ("Write a checklist for judging an image generated from this prompt: the main subjects, their "
               "attributes and actions, style and composition, and anything that must not appear.\nPrompt: {prompt}")


def with_context(prompt, title, context):
    """The evaluator's prompt: the scoring prompt plus the difference report or plan it was given."""
    return f"{prompt}\n\n{title}:\n{context}" if context else prompt


class OracleBackend:
    """The miniature world's judge: reads the scenes stored in each candidate's `toy` field."""

    def __init__(self, noise, seed):
        self.judges = {m: toy.OracleJudge(noise, m, seed) for m in ("report", "direct")}

    def edit(self, item, direct=False):
        t = item["toy"]
        src, out = toy.Scene.from_dict(t["scene"]), toy.Scene.from_dict(t["out_scene"])
        judge = self.judges["direct" if direct else "report"]
        report = None if direct else judge.difference_report(src, out)
        ans = judge.judge_edit(item["id"], src, out, t["edit"])
        return report, {m: ans[m][0] for m in EDIT_MODES}

    def gen(self, item, direct=False):
        t = item["toy"]
        want, got = toy.Scene.from_dict(t["scene"]), toy.Scene.from_dict(t["out_scene"])
        judge = self.judges["direct" if direct else "report"]
        plan = None if direct else judge.plan(want)
        ans = judge.judge_gen(item["id"], want, got, t.get("degrade"))
        return plan, {m: ans[m][0] for m in GEN_MODES}


class ChatBackend:
    """A model judge (reward.open_critic: a model directory or a served endpoint), asked the pipeline's questions."""

    def __init__(self, judge, max_new_tokens):
        self.judge, self.max_new_tokens = judge, max_new_tokens

    def chat(self, images, text):
        return self.judge.chat(images, text, self.max_new_tokens)

    def edit(self, item, direct=False):
        images = [item["_source"], item["_edited"]]
        report = None
        if not direct:
            report = "\n".join(self.chat(images, p) for p in DIFF_PROMPTS)
        return report, {m: self.chat(images, with_context(build_prompt(m, item["instruction"], item.get("requirement")),
                                                          "Difference report", report)) for m in EDIT_MODES}

    def gen(self, item, direct=False):
        plan = None if direct else self.chat([], PLAN_PROMPT.replace("{prompt}", item["prompt"]))
        return plan, {m: self.chat([item["_image"]], with_context(build_prompt(m, item["prompt"]), "Analysis plan", plan))
                      for m in GEN_MODES}


def make_backend(args):
    if args.judge == "oracle":
        return OracleBackend(args.judge_noise, args.seed)
    return ChatBackend(open_critic(args.judge), args.max_new_tokens)


# -----------------------------------------------------------------------------
# candidates of the miniature world (deterministic per index: a rerun makes the same items)

EDITOR_WEIGHTS = {"perfect": 0.15, "partial": 0.2, "wrong_object": 0.15, "no_op": 0.12, "extra_changes": 0.18,
                  "degraded": 0.08, "different": 0.12}


def toy_edit_candidate(split, i, args, rng=None):
    rng = rng or random.Random(f"{args.seed}:edit:{split}:{i}")
    src = toy.random_scene(rng)
    edit = toy.random_edit(rng, src, rng.choice(args.edit_ops.split(",")))
    editor = rng.choices(list(EDITOR_WEIGHTS), weights=list(EDITOR_WEIGHTS.values()))[0]
    out, degrade = toy.simulate_editor(rng, src, edit, editor)
    item = {"id": f"edit-{split}-{i:06d}", "instruction": toy.instruction(src, edit, rng),
            "toy": {"scene": src.to_dict(), "out_scene": out.to_dict(), "edit": edit, "editor": editor, "degrade": degrade}}
    if split == "train" and rng.random() < args.balance_share:
        item = balance(item, rng)
    return item, src, out, degrade


def balance(item, rng):
    """Score balancing (Sec 3.1): rewrite the instruction to a different edit of the same source."""
    src = toy.Scene.from_dict(item["toy"]["scene"])
    old = item["toy"]["edit"]
    for _ in range(20):
        new = toy.random_edit(rng, src)
        if new["op"] != old["op"] or new.get("target") != old.get("target"):
            break
    t = dict(item["toy"], edit=new, balanced=True)
    return dict(item, instruction=toy.instruction(src, new, rng), toy=t)


GEN_WEIGHTS = {"correct": 0.3, "missing_object": 0.15, "wrong_attribute": 0.2, "wrong_details": 0.2, "irrelevant": 0.15}


def toy_gen_candidate(split, i, args, rng=None):
    rng = rng or random.Random(f"{args.seed}:gen:{split}:{i}")
    want = toy.random_scene(rng)
    generator = rng.choices(list(GEN_WEIGHTS), weights=list(GEN_WEIGHTS.values()))[0]
    got, degrade = toy.simulate_generator(rng, want, generator)
    item = {"id": f"gen-{split}-{i:06d}", "prompt": toy.gen_prompt(want, rng),
            "difficulty": "easy" if len(want.objects) == 1 else "hard",
            "toy": {"scene": want.to_dict(), "out_scene": got.to_dict(), "generator": generator, "degrade": degrade}}
    return item, got, degrade


def noise_seed(item_id):
    """The seed of an image's degradation noise: a function of its id only (Python's hash() of a str changes
    from process to process, which made two runs of the pipeline draw different noise)."""
    return zlib.crc32(item_id.encode())


def write_toy_edit_images(root, item, src, out, degrade, size):
    """Images are written next to the manifest, named by id; existing files are kept (resume)."""
    paths = {"source": f"images/{item['id']}_src.png", "edited": f"images/{item['id']}_out.png"}
    for key, scene, deg in (("source", src, None), ("edited", out, degrade)):
        p = root / paths[key]
        if not p.exists():
            toy.render(scene, size, deg, seed=noise_seed(item["id"])).save(p)
    return dict(item, **paths)


def write_toy_gen_image(root, item, got, degrade, size):
    path = f"images/{item['id']}.png"
    if not (root / path).exists():
        toy.render(got, size, degrade, seed=noise_seed(item["id"])).save(root / path)
    return dict(item, image=path)


# -----------------------------------------------------------------------------
# judging with resume: each judged item is appended as soon as it is done

class Curator:
    def __init__(self, backend, root, max_items=None):
        self.backend, self.root, self.budget = backend, Path(root), max_items
        self.stats = collections.Counter()

    def exhausted(self):
        return self.budget is not None and self.stats["judged"] >= self.budget

    def run(self, kind, items, manifest, direct=False):
        """Judge `items` (edit or gen), appending to `manifest`; ids already there are skipped."""
        manifest = self.root / manifest
        failures = manifest.with_name(manifest.stem + "_failures.jsonl")
        done = {r["id"] for r in read_jsonl_resumable(manifest)} | {r["id"] for r in read_jsonl_resumable(failures)}
        modes = EDIT_MODES if kind == "edit" else GEN_MODES
        todo = [it for it in items if it["id"] not in done]
        for item in tqdm(todo, desc=f"judge {manifest.name}", disable=len(todo) < 50, file=sys.stdout, mininterval=5):
            if self.exhausted():
                return False
            self.attach_images(kind, item)
            context, answers = getattr(self.backend, kind)(item, direct=direct)
            parsed = {m: parse_score(answers[m], N_SCORES[m], m) for m in modes}
            bad = [m for m in modes if not parsed[m].ok]
            row = {k: v for k, v in item.items() if not k.startswith("_")}
            self.stats["judged"] += 1
            if bad:
                # unparseable: counted, logged with its id and raw text, dropped; never a number
                self.stats["unparseable"] += 1
                append_jsonl(failures, dict(row, failed_modes=bad, answers=answers, errors={m: parsed[m].error for m in bad}))
                continue
            row.update(context=context, answers=answers, scores={m: parsed[m].scores if N_SCORES[m] > 1 else parsed[m].scores[0] for m in modes})
            append_jsonl(manifest, row)
        return True

    def attach_images(self, kind, item):
        """Model judges need the pixels; a missing or corrupt image raises DataError naming the file."""
        if isinstance(self.backend, OracleBackend):
            return
        if kind == "edit":
            item["_source"] = load_image(item["source"], self.root)
            item["_edited"] = load_image(item["edited"], self.root)
        else:
            item["_image"] = load_image(item["image"], self.root)


# -----------------------------------------------------------------------------
# outputs: SFT files (messages + images), bench splits, RL prompt sets

def sft_records(rows, kind, image_prefix):
    """LLaMA-Factory-style multimodal records: the scoring prompt WITHOUT report/plan, the judge's answer."""
    out = []
    for r in rows:
        if kind == "edit":
            images = [image_prefix + r["source"], image_prefix + r["edited"]]  # original first, edited second
            for m in EDIT_MODES:
                prompt = build_prompt(m, r["instruction"], r.get("requirement"))
                out.append({"id": f"{r['id']}:{m}", "mode": m, "score": r["scores"][m], "images": images,
                            "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": r["answers"][m]}]})
        else:
            for m in GEN_MODES:
                prompt = build_prompt(m, r["prompt"])
                out.append({"id": f"{r['id']}:{m}", "mode": m, "score": r["scores"][m], "images": [image_prefix + r["image"]],
                            "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": r["answers"][m]}]})
    return out


def vlm_records(rows, kind, image_prefix, seed):
    """Seeing before judging (miniature world only): questions about the SFT pool's images answered from the
    ground-truth scenes. A randomly initialised tiny VLM first learns to describe an image and a change here
    (train_reward.py --task vlm), then learns to judge; a real Qwen3-VL base already can.
    Edit candidates: describe both images; what changed; what the instruction asks (reading the instruction is
    learned no faster than seeing). Gen candidates: describe; where is / is there."""
    out = []
    for r in rows:
        rng = random.Random(f"{seed}:vlm:{r['id']}")
        rec = lambda tag, images, q, a: {"id": f"{r['id']}:{tag}", "mode": "describe", "images": images,  # text, then images
                                         "messages": [{"role": "user", "content": q if IMAGE in q else q + "\n" + IMAGE * len(images)},
                                                      {"role": "assistant", "content": a}]}
        after = toy.Scene.from_dict(r["toy"]["out_scene"])
        if kind == "edit":
            before, images = toy.Scene.from_dict(r["toy"]["scene"]), [image_prefix + r["source"], image_prefix + r["edited"]]
            out.append(rec("describe", images, "Describe both images.",
                           f"Image 1: {toy.describe(before)}. Image 2: {toy.describe(after)}."))
            changes = [toy.change_phrase(before, after, c) for c in toy.scene_changes(before, after)]
            out.append(rec("changes", images, "What changed from image 1 to image 2?", "; ".join(changes or ["nothing"]) + "."))
            out.append(rec("asked", images, f"Instruction: {r['instruction']}\n{IMAGE * 2}What is asked?",
                           toy.request_summary(before, r["toy"]["edit"]) + "."))
        else:
            images = [image_prefix + r["image"]]
            out.append(rec("describe", images, "Describe the image.", toy.describe(after) + "."))
            if after.objects and rng.random() < 0.5:
                o = rng.choice(after.objects)
                out.append(rec("where", images, f"Where is the {o.name}?", f"At the {toy.cell_name(o.col, o.row)}."))
            else:
                color, shape = rng.choice(list(toy.COLORS)), rng.choice(toy.SHAPES)
                there = any(o.color == color and o.shape == shape for o in after.objects)
                out.append(rec("is-there", images, f"Is there a {color} {shape}?", "Yes." if there else "No."))
    return out


def split_val(records, share, seed):
    """Hold out whole candidates (both modes of one item stay together)."""
    key = lambda r: r["id"].rsplit(":", 1)[0]
    ids = sorted({key(r) for r in records})
    val = set(random.Random(seed).sample(ids, max(1, int(len(ids) * share))))
    return [r for r in records if key(r) not in val], [r for r in records if key(r) in val]


def write_outputs(args, root, image_dirs=None):
    """SFT files under <root>/sft; image paths are rewritten relative to that directory."""
    counts, vlm_train, vlm_val = {}, [], []
    for kind, suffix in [("edit", ""), ("gen", ""), ("edit", "_direct"), ("gen", "_direct")]:
        path = root / kind / f"curated{suffix}.jsonl"
        if not path.exists():
            continue
        image_dir = Path((image_dirs or {}).get(kind, root / kind)).resolve()
        prefix = os.path.relpath(image_dir, (root / "sft").resolve()) + "/"
        rows = read_jsonl(path)
        recs = sft_records(rows, kind, prefix)
        train, val = split_val(recs, args.val_share, args.seed)
        write_jsonl(root / "sft" / f"{kind}{suffix}_train.jsonl", train)
        write_jsonl(root / "sft" / f"{kind}{suffix}_val.jsonl", val)
        counts[f"{kind}{suffix}"] = score_histograms(train + val)
        if suffix == "" and rows and "toy" in rows[0]:  # the miniature world; the SFT split's val candidates held out
            vlm = split_val(vlm_records(rows, kind, prefix, args.seed), args.val_share, args.seed)
            vlm_train, vlm_val = vlm_train + vlm[0], vlm_val + vlm[1]
    if vlm_train:
        random.Random(args.seed).shuffle(vlm_train)
        write_jsonl(root / "sft" / "vlm_train.jsonl", vlm_train)
        write_jsonl(root / "sft" / "vlm_val.jsonl", vlm_val)
        counts["vlm"] = {"describe": {"n": len(vlm_train) + len(vlm_val)}}
    return counts


def score_histograms(records):
    hist = collections.defaultdict(collections.Counter)
    for r in records:
        for s in (r["score"] if isinstance(r["score"], list) else [r["score"]]):
            hist[r["mode"]][s] += 1
    return {m: {"n": sum(h.values()), **{str(k): h[k] for k in sorted(h)}} for m, h in hist.items()}


def build_toy_world(args, root, curator):
    """Candidates + images of the miniature world, then judging. Returns False if --max-items stopped it."""
    for d in ("edit/images", "gen/images", "bench/images", "rl/images"):
        (root / d).mkdir(parents=True, exist_ok=True)
    # SFT pools
    edit_items = [write_toy_edit_images(root / "edit", *toy_edit_candidate("train", i, args), args.size) for i in range(args.edit_train)]
    gen_items = [write_toy_gen_image(root / "gen", *toy_gen_candidate("train", i, args), args.size) for i in range(args.gen_train)]
    jobs = [("edit", edit_items, "edit/curated.jsonl", False), ("gen", gen_items, "gen/curated.jsonl", False)]
    if args.ablation_direct:
        jobs += [("edit", edit_items, "edit/curated_direct.jsonl", True), ("gen", gen_items, "gen/curated_direct.jsonl", True)]
    for kind, items, manifest, direct in jobs:
        if not curator.run(kind, items, manifest, direct):
            return False
    write_toy_bench(args, root, {json.dumps(it["toy"], sort_keys=True) for it in edit_items + gen_items})
    write_toy_rl(args, root)
    return True


def write_toy_bench(args, root, train_keys):
    """FIRM-Bench-like splits labelled with ground truth ("human" scores), disjoint from training."""
    def items(kind, n, mode):
        rows, i = [], 0
        while len(rows) < n:
            if kind == "edit":
                item, src, out, deg = toy_edit_candidate(f"bench-{mode}", i, args)
                key = json.dumps(item["toy"], sort_keys=True)
                if key not in train_keys:
                    item = write_toy_edit_images(root / "bench", item, src, out, deg, args.size)
                    score = (toy.execution_score if mode == "execution" else toy.consistency_score)(src, out, item["toy"]["edit"])
                    rows.append({k: item[k] for k in ("id", "source", "edited", "instruction")} | {"mode": mode, "human_score": score, "toy": item["toy"]})
            else:
                item, got, deg = toy_gen_candidate("bench", i, args)
                if json.dumps(item["toy"], sort_keys=True) not in train_keys:
                    item = write_toy_gen_image(root / "bench", item, got, deg, args.size)
                    score = toy.instruction_score(toy.Scene.from_dict(item["toy"]["scene"]), got)
                    rows.append({k: item[k] for k in ("id", "image", "prompt", "difficulty")} | {"mode": "instruction", "human_score": score, "toy": item["toy"]})
            i += 1
        return rows
    write_jsonl(root / "bench" / "edit_execution.jsonl", items("edit", args.bench_exec, "execution"))
    write_jsonl(root / "bench" / "edit_consistency.jsonl", items("edit", args.bench_cons, "consistency"))
    write_jsonl(root / "bench" / "gen.jsonl", items("gen", args.bench_gen, "instruction"))


def write_toy_rl(args, root):
    """RL prompt sets: edit {id, prompt, image, requirement} with the target scene for the pixel judge; gen {id, prompt}."""
    for split, n in (("train", args.rl_train), ("test", args.rl_test)):
        edits, gens = [], []
        for i in range(n):
            rng = random.Random(f"{args.seed}:rl-edit:{split}:{i}")
            src = toy.random_scene(rng)
            edit = toy.random_edit(rng, src)
            path = f"images/edit-{split}-{i:05d}.png"
            if not (root / "rl" / path).exists():
                toy.render(src, args.size).save(root / "rl" / path)
            edits.append({"id": f"rl-edit-{split}-{i:05d}", "prompt": toy.instruction(src, edit, rng), "image": path,
                          "requirement": None, "toy": {"scene": src.to_dict(), "edit": edit,
                                                      "target_scene": toy.apply_edit(src, edit).to_dict()}})
            rng = random.Random(f"{args.seed}:rl-gen:{split}:{i}")
            want = toy.random_scene(rng)
            gens.append({"id": f"rl-gen-{split}-{i:05d}", "prompt": toy.gen_prompt(want, rng), "toy": {"scene": want.to_dict()}})
        write_jsonl(root / "rl" / f"edit_{split}.jsonl", edits)
        write_jsonl(root / "rl" / f"gen_{split}.jsonl", gens)


def build_critic_base(root, args):
    """The tiny Qwen3-VL critic base, its tokenizer trained on the world's prompts and answers. Built under a
    temporary name and renamed when complete: a killed build is built again, never taken for a finished one."""
    out = root.parent / "models" / "critic-base"
    if (out / "config.json").exists():
        return out
    texts = []
    for f in sorted((root / "sft").glob("*.jsonl")):
        texts += [m["content"] for r in read_jsonl(f) for m in r["messages"]]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    n = toy.build_tiny_critic(tmp, texts, image_size=args.size, vision_steps=args.critic_vision_steps, seed=args.seed)
    replace_dir(tmp, out)
    print(f"built tiny critic base ({n / 1e6:.2f} M params, Qwen3VLForConditionalGeneration, vision tower pre-trained "
          f"{args.critic_vision_steps} steps) at {out}")
    return out


# -----------------------------------------------------------------------------

def real_candidates(path, kind):
    """Every candidate checked before anything is judged (a paid judge must not judge 9000 items and then stop at a
    corrupt image): fields and types, unique ids, every image present and decodable."""
    fields = ({"id": "id", "source": "image", "edited": "image", "instruction": "text", "requirement": "str?"}
              if kind == "edit" else {"id": "id", "image": "image", "prompt": "text", "requirement": "str?"})
    return read_manifest(path, fields, images="decode")


def main(args):
    t0 = time.time()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / "curate_args.json", vars(args))
    if args.edit_candidates or args.gen_candidates:
        # real data: images stay where the candidate manifest points (paths relative to it); all checked first
        candidates = {kind: real_candidates(path, kind) for kind, path in (("edit", args.edit_candidates),
                                                                          ("gen", args.gen_candidates)) if path}
        curator, image_dirs = Curator(make_backend(args), root, args.max_items), {}
        for kind, path in (("edit", args.edit_candidates), ("gen", args.gen_candidates)):
            if not path:
                continue
            curator.root = image_dirs[kind] = Path(path).resolve().parent
            items = candidates[kind]
            if kind == "edit":
                rng = random.Random(args.seed)
                for it in rng.sample(items, int(len(items) * args.balance_share)):
                    other = rng.choice([o for o in items if o["instruction"] != it["instruction"]] or items)
                    items.append(dict(it, id=it["id"] + ":balanced", instruction=other["instruction"], balanced=True))
            jobs = [False, True] if args.ablation_direct else [False]
            for direct in jobs:
                name = f"curated{'_direct' if direct else ''}.jsonl"
                if not curator.run(kind, items, root.resolve() / kind / name, direct):
                    print(f"stopped after --max-items {args.max_items}; rerun to resume")
                    return
        counts = write_outputs(args, root, image_dirs)
        print(f"judged {curator.stats['judged']} items, {curator.stats['unparseable']} unparseable (see *_failures.jsonl)")
        print(json.dumps(counts, indent=1))
        return
    if args.judge != "oracle":
        sys.exit("error: the miniature world is judged by the oracle; give --edit-candidates/--gen-candidates for model judges")
    curator = Curator(make_backend(args), root, args.max_items)
    if not build_toy_world(args, root, curator):
        print(f"stopped after --max-items {args.max_items}; rerun to resume")
        return
    counts = write_outputs(args, root)
    build_critic_base(root, args)
    summary = {"seconds": round(time.time() - t0, 1), "judged_this_run": curator.stats["judged"],
               "unparseable_this_run": curator.stats["unparseable"], "sft": counts,
               "bench": {f.stem: score_histograms([{"mode": r["mode"], "score": r["human_score"]} for r in read_jsonl(f)])
                         for f in sorted((root / "bench").glob("*.jsonl"))},
               "rl": {f.stem: len(read_jsonl(f)) for f in sorted((root / "rl").glob("*.jsonl"))}}
    write_json(root / "summary.json", summary)
    print("counts per split and score level (score: count):")
    for group in ("sft", "bench"):
        for name, modes in summary[group].items():
            for m, h in modes.items():
                print(f"  {group}/{name:<22} {m:<12} n={h['n']:<5} " + " ".join(f"{k}:{v}" for k, v in h.items() if k != "n"))
    print("  rl: " + ", ".join(f"{k}={v}" for k, v in summary["rl"].items()))
    print(f"done in {summary['seconds']} s -> {root}")


if __name__ == "__main__":
    run_stage(main, get_args())
