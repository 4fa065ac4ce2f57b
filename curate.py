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
WITHOUT the report or plan (Sec 4.1), so the critic learns to judge directly.

The judge (--judge) is named as every script names a critic (reward.open_critic): a model directory run in
process (e.g. Qwen3-VL-8B-Instruct), an OpenAI-compatible endpoint such as a vLLM server
(http://host:port/v1[#served model name]), or a Python factory package.module:name whose object answers the
pipelines itself (has edit() and gen(), like the miniature world's teacher, toy.oracle:teacher).

    python curate.py --judge /ckpt/Qwen3-VL-8B-Instruct --edit-candidates my_edits.jsonl --gen-candidates my_gens.jsonl \\
        --out data/
    python curate.py --judge http://judge-host:8000/v1#qwen3-vl-235b --edit-candidates my_edits.jsonl --out data/
    python curate.py --preset mini        # the miniature world's candidates (python -m toy world) and teacher

Output (--out): {edit,gen}/curated.jsonl (the judged candidates with the report or plan, the answers and the
scores; unparseable answers go to curated_failures.jsonl), sft/{edit,gen}_{train,val}.jsonl for train_reward.py,
summary.json.

Departures from the paper:
  1. Balancing gives a share of the edit candidates another record's instruction, added as extra records
     (id + ":balanced"), instead of asking an LLM to rewrite it. (The miniature world balances its own pool, with
     ground truth; the mini preset switches this off.)
  2. `--ablation-direct` also writes SFT files judged WITHOUT report/plan (the paper's argument,
     testable here: does the curated critic beat one trained on directly judged labels?).
"""

import argparse
import collections
import os
import random
import sys
import time
from pathlib import Path

from tqdm import tqdm

from common import (DataError, append_jsonl, load_image, parse_with_preset, preset_line, read_jsonl, read_jsonl_resumable,
                    read_manifest, run_stage, write_json, write_jsonl)
from reward import EDIT_MODES, GEN_MODES, N_SCORES, build_prompt, is_factory, load_factory, load_prompts, open_critic, parse_score

# -----------------------------------------------------------------------------
# CLI: the defaults are the paper's; a preset names the miniature world's files and judge.

# The miniature world: `python -m toy world` draws the candidate pools (already balanced, with ground truth), the
# teacher knows the scenes (noise 0.15: it misses details, more often when it scores directly).
PRESETS = {"mini": dict(edit_candidates="runs/mini/data/edit/candidates.jsonl",
                        gen_candidates="runs/mini/data/gen/candidates.jsonl", judge="toy.oracle:teacher",
                        balance_share=0.0, out="runs/mini/data")}


def get_args(argv=None):
    ap = argparse.ArgumentParser(description="FIRM data curation", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # Data
    ap.add_argument("--edit-candidates", default=None, help="JSONL {id, source, edited, instruction[, requirement]}")
    ap.add_argument("--gen-candidates", default=None, help="JSONL {id, image, prompt[, requirement]}")
    ap.add_argument("--out", default=None, help="output dataset directory")
    # Judge
    ap.add_argument("--judge", default=None, help="a model directory (run in process), an OpenAI-compatible endpoint "
                    "http://host:port/v1[#served name] (key from $FIRM_CRITIC_API_KEY), or a factory package.module:name")
    ap.add_argument("--max-new-tokens", type=int, default=512, help="model judges: tokens per answer")
    ap.add_argument("--prompt-file", default=None, help="the critic's scoring templates, JSON {mode: template} "
                    "(reward.load_prompts), written into the SFT records and asked of a model judge: e.g. the release's, "
                    "to train on from FIRM-Edit-8B / FIRM-Gen-8B; the critic is then scored with the same file")
    # Curation
    ap.add_argument("--balance-share", type=float, default=0.1, help="share of edit candidates added again with a "
                    "mismatched instruction (score balancing, Sec 3.1)")
    ap.add_argument("--val-share", type=float, default=0.05, help="share of SFT candidates held out for the eval loss")
    ap.add_argument("--ablation-direct", type=int, default=1, help="also judge without report/plan (ablation SFT files)")
    ap.add_argument("--max-items", type=int, default=None, help="stop after judging this many new items (staged runs)")
    ap.add_argument("--seed", type=int, default=0, help="balancing and the SFT split")
    args = parse_with_preset(ap, PRESETS, argv, required=("judge", "out"))
    if not (args.edit_candidates or args.gen_candidates):
        ap.error("give --edit-candidates and/or --gen-candidates (or --preset mini)")
    return args


# -----------------------------------------------------------------------------
# judges. A model judge answers the pipeline's questions with TEXT (ChatBackend asks them); a factory's object
# answers them itself. curate.py parses every answer, so a teacher's answers go through the parser a model's do.

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


class ChatBackend:
    """A model judge (reward.open_critic: a model directory or a served endpoint), asked the pipeline's questions.
    edit(item) / gen(item) -> (difference report or plan, {mode: answer text}); item["_root"]: where its images are."""

    def __init__(self, judge, max_new_tokens, prompts):
        self.judge, self.max_new_tokens, self.prompts = judge, max_new_tokens, prompts

    def chat(self, images, text):
        return self.judge.chat(images, text, self.max_new_tokens)

    def edit(self, item, direct=False):
        images = [load_image(item["source"], item["_root"]), load_image(item["edited"], item["_root"])]  # original first
        report = None
        if not direct:
            report = "\n".join(self.chat(images, p) for p in DIFF_PROMPTS)
        return report, {m: self.chat(images, with_context(build_prompt(m, item["instruction"], item.get("requirement"),
                                                                       self.prompts), "Difference report", report))
                         for m in EDIT_MODES}

    def gen(self, item, direct=False):
        image = load_image(item["image"], item["_root"])
        plan = None if direct else self.chat([], PLAN_PROMPT.replace("{prompt}", item["prompt"]))
        return plan, {m: self.chat([image], with_context(build_prompt(m, item["prompt"], item.get("requirement"),
                                                                      self.prompts), "Analysis plan", plan))
                      for m in GEN_MODES}


def make_backend(args, prompts):
    """A factory's object that has edit() and gen() runs the pipelines itself (the world's teacher); any other
    judge must answer questions (chat()) and is asked them by ChatBackend."""
    judge = load_factory(args.judge) if is_factory(args.judge) else open_critic(args.judge)
    if callable(getattr(judge, "edit", None)) and callable(getattr(judge, "gen", None)):
        return judge
    if not callable(getattr(judge, "chat", None)):
        raise DataError(f"--judge {args.judge}: {type(judge).__name__} neither runs the pipelines (edit, gen) nor chats")
    return ChatBackend(judge, args.max_new_tokens, prompts)


# -----------------------------------------------------------------------------
# candidates and score balancing (Sec 3.1)

def read_candidates(path, kind):
    """Every candidate checked before anything is judged (a paid judge must not judge 9000 items and then stop at a
    corrupt image): fields and types, unique ids, every image present and decodable."""
    fields = ({"id": "id", "source": "image", "edited": "image", "instruction": "text", "requirement": "str?"}
              if kind == "edit" else {"id": "id", "image": "image", "prompt": "text", "requirement": "str?"})
    return read_manifest(path, fields, images="decode")


def balance(items, share, seed):
    """Score balancing: low execution scores are rare, so a share of the edit candidates is added again with
    another record's instruction (id + ":balanced"), which its edited image no longer matches. The judge still
    scores them: a borrowed instruction may happen to match."""
    rng = random.Random(seed)
    for it in rng.sample(items, int(len(items) * share)):
        others = [o for o in items if o["instruction"] != it["instruction"]]
        if not others:
            raise DataError(f"cannot balance {it['id']!r}: no candidate has another instruction (use --balance-share 0)")
        items.append(dict(it, id=it["id"] + ":balanced", instruction=rng.choice(others)["instruction"], balanced=True))
    return items


# -----------------------------------------------------------------------------
# judging with resume: each judged item is appended as soon as it is done

class Curator:
    def __init__(self, backend, max_items=None):
        self.backend, self.budget = backend, max_items
        self.stats = collections.Counter()

    def exhausted(self):
        return self.budget is not None and self.stats["judged"] >= self.budget

    def run(self, kind, items, image_root, manifest, direct=False):
        """Judge `items` (edit or gen, images under `image_root`), appending to `manifest`; ids already there (or
        in its failures file) are skipped. False if --max-items stopped it."""
        failures = manifest.with_name(manifest.stem + "_failures.jsonl")
        done = {r["id"] for r in read_jsonl_resumable(manifest)} | {r["id"] for r in read_jsonl_resumable(failures)}
        modes = EDIT_MODES if kind == "edit" else GEN_MODES
        todo = [it for it in items if it["id"] not in done]
        for item in tqdm(todo, desc=f"judge {manifest.name}", disable=len(todo) < 50, file=sys.stdout, mininterval=5):
            if self.exhausted():
                return False
            context, answers = getattr(self.backend, kind)(dict(item, _root=image_root), direct=direct)
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


# -----------------------------------------------------------------------------
# outputs: SFT files (messages + images), relative to the sft/ folder

def sft_records(rows, kind, image_prefix, prompts):
    """LLaMA-Factory-style multimodal records: the scoring prompt (`prompts`' template) WITHOUT report/plan, the
    judge's answer."""
    out = []
    for r in rows:
        if kind == "edit":
            images = [image_prefix + r["source"], image_prefix + r["edited"]]  # original first, edited second
            for m in EDIT_MODES:
                prompt = build_prompt(m, r["instruction"], r.get("requirement"), prompts)
                out.append({"id": f"{r['id']}:{m}", "mode": m, "score": r["scores"][m], "images": images,
                            "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": r["answers"][m]}]})
        else:
            for m in GEN_MODES:
                prompt = build_prompt(m, r["prompt"], r.get("requirement"), prompts)
                out.append({"id": f"{r['id']}:{m}", "mode": m, "score": r["scores"][m], "images": [image_prefix + r["image"]],
                            "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": r["answers"][m]}]})
    return out


def split_val(records, share, seed):
    """Hold out whole candidates (both modes of one item stay together)."""
    key = lambda r: r["id"].rsplit(":", 1)[0]
    ids = sorted({key(r) for r in records})
    val = set(random.Random(seed).sample(ids, max(1, int(len(ids) * share))))
    return [r for r in records if key(r) not in val], [r for r in records if key(r) in val]


def write_outputs(args, root, image_dirs, prompts):
    """SFT files under <root>/sft; image paths are rewritten relative to that directory."""
    counts = {}
    for kind, suffix in [("edit", ""), ("gen", ""), ("edit", "_direct"), ("gen", "_direct")]:
        path = root / kind / f"curated{suffix}.jsonl"
        if not path.exists():
            continue
        prefix = os.path.relpath(image_dirs[kind], (root / "sft").resolve()) + "/"
        recs = sft_records(read_jsonl(path), kind, prefix, prompts)
        train, val = split_val(recs, args.val_share, args.seed)
        write_jsonl(root / "sft" / f"{kind}{suffix}_train.jsonl", train)
        write_jsonl(root / "sft" / f"{kind}{suffix}_val.jsonl", val)
        counts[f"{kind}{suffix}"] = score_histograms(train + val)
    return counts


def score_histograms(records):
    hist = collections.defaultdict(collections.Counter)
    for r in records:
        for s in (r["score"] if isinstance(r["score"], list) else [r["score"]]):
            hist[r["mode"]][s] += 1
    return {m: {"n": sum(h.values()), **{str(k): h[k] for k in sorted(h)}} for m, h in hist.items()}


# -----------------------------------------------------------------------------

def main(args):
    t0 = time.time()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / "curate_args.json", vars(args))
    if args.preset:
        print(preset_line(args, PRESETS))

    prompts = load_prompts(args.prompt_file)  # a broken template file stops here, before anything is judged
    # Every candidate checked first; images stay where the candidate manifest points (paths relative to it)
    paths = {kind: Path(p) for kind, p in (("edit", args.edit_candidates), ("gen", args.gen_candidates)) if p}
    candidates = {kind: read_candidates(path, kind) for kind, path in paths.items()}
    if "edit" in candidates:
        candidates["edit"] = balance(candidates["edit"], args.balance_share, args.seed)
    image_dirs = {kind: path.resolve().parent for kind, path in paths.items()}

    # Judge: difference report / plan first, then the scores; with --ablation-direct again without them
    curator = Curator(make_backend(args, prompts), args.max_items)
    for kind in paths:
        for direct in ([False, True] if args.ablation_direct else [False]):
            manifest = root.resolve() / kind / f"curated{'_direct' if direct else ''}.jsonl"
            if not curator.run(kind, candidates[kind], image_dirs[kind], manifest, direct):
                print(f"stopped after --max-items {args.max_items}; rerun to resume")
                return

    # SFT files for train_reward.py, and what was made
    counts = write_outputs(args, root, image_dirs, prompts)
    summary = {"seconds": round(time.time() - t0, 1), "judged_this_run": curator.stats["judged"],
               "unparseable_this_run": curator.stats["unparseable"], "sft": counts}
    write_json(root / "summary.json", summary)
    print(f"judged {curator.stats['judged']} items, {curator.stats['unparseable']} unparseable (see *_failures.jsonl)")
    print("SFT records per split and score level (score: count):")
    for name, modes in counts.items():
        for m, h in modes.items():
            print(f"  sft/{name:<14} {m:<12} n={h['n']:<5} " + " ".join(f"{k}:{v}" for k, v in h.items() if k != "n"))
    print(f"done in {summary['seconds']} s -> {root}")


if __name__ == "__main__":
    run_stage(main, get_args())
