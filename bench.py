"""FIRM-Bench for critics (Sec 3.3) and evaluation of RL-tuned policies (Sec 4), plus the pipeline report.

critics: every critic scores every bench item; the paper's metric is the MAE between the critic's
integer score and the human score, for edit execution, edit consistency, edit overall (POOLED over
the items of both, not the mean of the two MAEs) and gen (easy, hard, overall). Beside it we report
what users of the peers look at: pairwise accuracy on pairs with different human scores
(EditReward-Bench style; a tied prediction earns half), Spearman correlation, the parse-failure
rate, and a confusion matrix PNG (human score x predicted score, last column = no score).

    python bench.py critics --preset mini                        # the miniature world's table
    python bench.py critics --bench-dir /data/FIRM-Bench --layout firm-release \\
        --critic FIRM-Edit-8B=/ckpt/FIRM-Edit-8B@edit --critic qwen3vl=/ckpt/Qwen3-VL-8B-Instruct \\
        --critic server=http://10.0.0.5:8765 --critic mine=file:preds.jsonl
    torchrun --standalone --nproc_per_node=8 bench.py critics ...   # each rank scores its shard

policy: held-out prompts / edit requests, fixed seeds (the same for base and tuned, so the two differ
only by the policy), scored by a judge that did NOT train the policy: in the miniature world the
pixel judge (compares against the exactly known target scene), or any critic (critic:PATH).

    python bench.py policy --kind gen --base runs/mini/models/gen-base --tuned runs/mini/rl_gen \\
        --prompts runs/mini/data/rl/gen_test.jsonl --judge pixel
    python bench.py policy --kind edit --base runs/mini/models/edit-base --tuned runs/mini/rl_edit_cme/lora \\
        --prompts runs/mini/data/rl/edit_test.jsonl --judge critic:runs/mini/models/edit-critic
    python bench.py report --preset mini                         # runs/mini/REPORT.md

Critic specs (--critic NAME=SPEC[@edit|@gen], @ = score only those splits): a model directory, a reward
server URL, file:preds.jsonl ({id, mode?, text | scores}, e.g. from the release's vllm_infer.py), and the
baselines "constant" (the SFT training set's mean score per mode, rounded; "constant:k" for a fixed k) and
"oracle:noise[:report|direct]" (the miniature world's teacher, toy.OracleJudge, on each item's `toy` field;
oracle:0.15:report is the teacher that labelled the SFT data). The mini preset adds the untrained
critic-base, whose garbage answers show that parse failures are counted.

Failures are never dropped silently. "MAE" is over items with a parsed score, with the failure and
missing counts beside it; "MAE (fail=worst)" counts every failed or missing item as the largest error
possible for its human score, max(h - 1, 5 - h). Pairwise accuracy and Spearman are over parsed items.
Runs resume: predictions are appended per rank (preds/<critic>/part-<rank>.jsonl), merged by rank 0,
and a rerun scores only what is missing; a changed critic (other weights or decoding flags) starts over.

Bench layouts (--layout): "mini" is what curate.py writes (edit_execution.jsonl, edit_consistency.jsonl,
gen.jsonl; fields id, source, edited, instruction | image, prompt, difficulty, human_score; image paths
relative to the bench dir). "firm-release" reads the released FIRM-Bench directory
(FIRM-Bench-Edit/, FIRM-Bench-Gen/, each with bench_v1.jsonl and result/human_bench_v1.jsonl joined
by id). The gen fields follow the release's gen_mae.py (id; image = a list, "en/..." easy, "en_long/..."
hard; instruction_following.score[0]). The edit fields and the prompt field are ASSUMPTIONS (the
release's edit_mae.py was not readable offline): fix them with --field-map '{"execution.human_score":
"exec.score.0", "instruction": "edit_prompt"}' (dotted paths; numbers index lists; a key without a split
prefix applies to every split). A field that cannot be found is an error naming the file, line and field.

Departures from the paper:
  1. The paper reports MAE only; parse failures cannot occur in its table. We add the failure-aware
     variants, pairwise accuracy, Spearman and confusion matrices.
  2. The miniature bench's "human" scores are the world's exact ground truth (toy.py rubrics).
  3. Pairwise accuracy gives a tied prediction half credit (integer critics tie often); peers differ.
"""

import argparse
import hashlib
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw

from common import (DataError, append_jsonl, cleanup_dist, die, image_grid, load_image, plot_curves, print0,
                    read_jsonl, read_jsonl_resumable, setup_dist, write_json, write_jsonl)

SPLIT_MODE = {"execution": "execution", "consistency": "consistency", "gen": "instruction"}
SPLIT_KIND = {"execution": "edit", "consistency": "edit", "gen": "gen"}
PRESETS = {"mini": {"critics": dict(  # the miniature world: what curate.py and train_reward.py write
    bench_dir="runs/mini/data/bench", out="runs/mini/bench", sft_dir="runs/mini/data/sft", max_new_tokens=160,
    critic=["edit-critic=runs/mini/models/edit-critic@edit", "gen-critic=runs/mini/models/gen-critic@gen",
            "edit-critic-direct=runs/mini/models/edit-critic-direct@edit",
            "gen-critic-direct=runs/mini/models/gen-critic-direct@gen", "critic-base=runs/mini/models/critic-base",
            "constant=constant", "oracle-noisy=oracle:0.15:report", "oracle-direct=oracle:0.15:direct"])}}
# FIRM-Bench MAE of the paper (FIRM_NOTES section 5), shown beside ours for reference
PAPER = [("FIRM-Edit-8B", 0.53, 0.73, 0.62, None), ("FIRM-Gen-8B", None, None, None, 0.51),
         ("Qwen3-VL-8B-Instruct", 0.66, 1.12, 0.87, 0.63), ("GPT-5", 0.62, 0.73, 0.67, 0.52)]

# -----------------------------------------------------------------------------
# metrics: small pure functions (tests check them against hand-computed values)


def mae(pred, human):
    """Mean absolute error; nan for no items."""
    return float(np.mean(np.abs(np.asarray(pred, float) - np.asarray(human, float)))) if len(pred) else float("nan")


def pooled_mae(groups):
    """MAE over the items of several groups together ([(pred, human), ...]): the paper's edit "overall",
    which weights each group by its item count (not the mean of the groups' MAEs)."""
    return mae([p for g in groups for p in g[0]], [h for g in groups for h in g[1]])


def worst_error(h, lo=1, hi=5):
    """The largest error any prediction in lo..hi can make for human score h: what a failure costs."""
    return max(h - lo, hi - h)


def pairwise_accuracy(pred, human):
    """Share of item pairs with different human scores that the prediction orders the same way; a tied
    prediction counts 1/2 (a constant predictor scores exactly 0.5). nan when no pair qualifies."""
    p, h = np.asarray(pred, float), np.asarray(human, float)
    i, j = np.triu_indices(len(h), 1)
    dh, dp = np.sign(h[i] - h[j]), np.sign(p[i] - p[j])
    keep = dh != 0
    if not keep.any():
        return float("nan")
    return float(np.where(dp[keep] == 0, 0.5, (dp[keep] == dh[keep]).astype(float)).mean())


def rankdata(x):
    """1-based ranks, ties get the average of the ranks they span."""
    x = np.asarray(x, float)
    r = np.empty(len(x))
    r[np.argsort(x, kind="mergesort")] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        r[x == v] = r[x == v].mean()
    return r


def spearman(x, y):
    """Spearman correlation = Pearson correlation of the average ranks; nan if either side is constant."""
    if len(x) < 2:
        return float("nan")
    rx, ry = rankdata(x), rankdata(y)
    return float("nan") if rx.std() == 0 or ry.std() == 0 else float(np.corrcoef(rx, ry)[0, 1])


def mean_ci(values, z=1.96):
    """(mean, half-width of the normal-approximation 95% CI: z * std / sqrt(n)); nan when empty."""
    v = np.asarray(values, float)
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(z * v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")


def group_metrics(human, pred):
    """One group's numbers. pred[i] is a score, "fail" (no parsable score) or "missing" (no prediction)."""
    ok = [(h, p) for h, p in zip(human, pred) if not isinstance(p, str)]
    hs, ps = [h for h, _ in ok], [p for _, p in ok]
    worst = [abs(p - h) if not isinstance(p, str) else worst_error(h) for h, p in zip(human, pred)]
    return {"n": len(human), "parsed": len(ok), "failures": sum(p == "fail" for p in pred),
            "missing": sum(p == "missing" for p in pred), "mae": mae(ps, hs),
            "mae_fail_worst": float(np.mean(worst)) if worst else float("nan"),
            "pairwise_acc": pairwise_accuracy(ps, hs), "spearman": spearman(ps, hs)}


def confusion(human, pred):
    """5 x 6 counts: row = human score 1..5, column = rounded prediction 1..5, last column = no score."""
    m = np.zeros((5, 6), int)
    for h, p in zip(human, pred):
        m[int(h) - 1, 5 if isinstance(p, str) else int(min(5, max(1, round(p)))) - 1] += 1
    return m.tolist()


# -----------------------------------------------------------------------------
# bench reader: one adapter, field paths per layout (see the docstring)

MINI_EDIT = {"id": "id", "source": "source", "edited": "edited", "instruction": "instruction", "human_score": "human_score"}
LAYOUTS = {
    "mini": [dict(split="execution", file="edit_execution.jsonl", fields=MINI_EDIT),
             dict(split="consistency", file="edit_consistency.jsonl", fields=MINI_EDIT),
             dict(split="gen", file="gen.jsonl", fields={"id": "id", "image": "image", "prompt": "prompt",
                                                          "human_score": "human_score", "difficulty": "difficulty"})],
    "firm-release": [
        dict(split=s, file="FIRM-Bench-Edit/bench_v1.jsonl", scores="FIRM-Bench-Edit/result/human_bench_v1.jsonl",
             root="FIRM-Bench-Edit", skip_unscored=True,  # assumed: a row carries the score(s) it was rated for
             fields={"id": "id", "source": "image.0", "edited": "image.1", "instruction": "prompt",
                     "human_score": f"{s}.score.0"}) for s in ("execution", "consistency")] + [
        dict(split="gen", file="FIRM-Bench-Gen/bench_v1.jsonl", scores="FIRM-Bench-Gen/result/human_bench_v1.jsonl",
             root="FIRM-Bench-Gen", difficulty_by_prefix={"en/": "easy", "en_long/": "hard"},
             fields={"id": "id", "image": "image.0", "prompt": "prompt", "human_score": "instruction_following.score.0"})]}
KNOWN_FIELDS = {"id", "source", "edited", "instruction", "image", "prompt", "difficulty", "human_score"}
_MISSING = object()


def get_path(row, path):
    """row["a"]["b"][0] for path "a.b.0"; _MISSING when any step is absent."""
    for part in path.split("."):
        if isinstance(row, list) and part.isdigit() and int(part) < len(row):
            row = row[int(part)]
        elif isinstance(row, dict) and part in row:
            row = row[part]
        else:
            return _MISSING
    return row


def _lines(path):
    """(line number, record) of a JSONL file, or of a JSON list (line = index + 1)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return list(enumerate(json.loads(text), 1))
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    return out


def read_bench(bench_dir, layout="mini", field_map=None, limit=None):
    """Items {key, split, mode, id, human_score, root, source/edited/instruction | image/prompt/difficulty[, toy]}."""
    bench_dir, items = Path(bench_dir), []
    if layout not in LAYOUTS:
        raise DataError(f"unknown layout {layout!r}; expected one of {sorted(LAYOUTS)}")
    for spec in LAYOUTS[layout]:
        split, path = spec["split"], bench_dir / spec["file"]
        fields = dict(spec["fields"])
        for k, v in (field_map or {}).items():  # "field" applies everywhere, "split.field" to one split
            s, _, f = k.rpartition(".")
            if s not in ("", *SPLIT_MODE) or f not in KNOWN_FIELDS:
                raise DataError(f"--field-map key {k!r}: expected [split.]field, split in {list(SPLIT_MODE)}, "
                                f"field in {sorted(KNOWN_FIELDS)}")
            if s in ("", split) and (f in fields or f == "difficulty" and split == "gen"):
                fields[f] = v
        extra = {}
        if spec.get("scores") and (bench_dir / spec["scores"]).is_file():
            extra = {str(get_path(r, fields["id"])): r for _, r in _lines(bench_dir / spec["scores"])}
        seen, rows = set(), []
        for n, raw in _lines(path):
            row = {**raw, **extra.get(str(get_path(raw, fields["id"])), {})}
            if spec.get("skip_unscored") and get_path(row, fields["human_score"]) is _MISSING:
                continue
            item = {"split": split, "mode": SPLIT_MODE[split], "root": str(bench_dir / spec.get("root", ""))}
            for name, fpath in fields.items():
                v = get_path(row, fpath)
                if v is _MISSING:
                    raise DataError(f"{path}:{n}: missing field '{name}' (looked for '{fpath}'"
                                    f"{' here and in ' + spec['scores'] if spec.get('scores') else ''}); "
                                    f"map it with --field-map '{{\"{split}.{name}\": \"...\"}}'")
                item[name] = v
            h = item["human_score"]
            if isinstance(h, bool) or not isinstance(h, (int, float)) or not 1 <= h <= 5:
                raise DataError(f"{path}:{n}: field 'human_score' ('{fields['human_score']}') = {h!r} is not a score in 1..5")
            if split == "gen" and "difficulty" not in item:
                item["difficulty"] = next((d for p, d in spec.get("difficulty_by_prefix", {}).items()
                                           if str(item["image"]).startswith(p)), "unknown")
            if item["id"] in seen:
                raise DataError(f"{path}:{n}: duplicate id '{item['id']}'")
            seen.add(item["id"])
            item["key"] = f"{split}/{item['id']}"
            if "toy" in row:
                item["toy"] = row["toy"]
            rows.append(item)
        if not rows:
            raise DataError(f"{path}: no item of split '{split}' (field '{fields['human_score']}' found in no row)")
        items += rows[:limit]
    return items


# -----------------------------------------------------------------------------
# critics: a model directory, a reward server URL, a prediction file, or a baseline.
# Every scorer answers predict(mode, items) -> list of Judgement (None = no prediction for that item).


class ModelScorer:
    def __init__(self, spec, args, device):
        import reward
        self.score = (reward.RewardClient(spec) if spec.startswith(("http://", "https://")) else
                      reward.Critic(spec, device=device, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)).score
        self.method, self.samples = args.method, args.samples

    def predict(self, mode, items):
        keys = ("source", "edited") if mode in ("execution", "consistency") else ("image",)
        pil = [{**{k: load_image(it[k], it["root"]) for k in keys}, "instruction": it.get("instruction"),
                "prompt": it.get("prompt"), "requirement": it.get("requirement")} for it in items]
        return self.score(mode, pil, method=self.method, samples=self.samples)


class TextScorer:
    """Baselines that write an answer TEXT, parsed by the same parser as a model's answer."""

    def __init__(self, answer):
        self.answer = answer

    def predict(self, mode, items):
        from reward import Judgement, parse_score
        out = []
        for it in items:
            text = self.answer(mode, it)
            p = None if text is None else parse_score(text)
            out.append(None if p is None else Judgement(p.scores, text, p.ok, p.error, p.how))
        return out


def constant_scores(sft_dir):
    """The training-set mean score per mode, rounded: the best constant predictor one can know in advance."""
    out = {}
    for kind in ("edit", "gen"):
        for r in read_jsonl(Path(sft_dir) / f"{kind}_train.jsonl", required=("mode", "score")):
            if not isinstance(r["score"], list):
                out.setdefault(r["mode"], []).append(r["score"])
    return {m: int(round(float(np.mean(v)))) for m, v in out.items()}


def oracle_answer(noise, mode_name):
    """The miniature world's teacher (toy.OracleJudge) on each item's `toy` field."""
    import toy
    judge = toy.OracleJudge(noise, mode_name)

    def answer(mode, it):
        if "toy" not in it:
            raise DataError(f"item {it['key']}: the oracle baseline needs the miniature world's 'toy' field")
        t, S = it["toy"], toy.Scene.from_dict
        if mode == "instruction":
            return judge.judge_gen(it["id"], S(t["scene"]), S(t["out_scene"]), t.get("degrade"))[mode][0]
        return judge.judge_edit(it["id"], S(t["scene"]), S(t["out_scene"]), t["edit"])[mode][0]
    return answer


def file_answer(path):
    """Predictions made elsewhere: JSONL {id, mode?, text | scores}; an id absent from the file is 'missing'."""
    rows = {(r.get("mode"), str(r["id"])): r for r in read_jsonl(path, required=("id",))}

    def answer(mode, it):
        r = rows.get((mode, str(it["id"]))) or rows.get((None, str(it["id"])))
        if r is None:
            return None
        s = r.get("scores", r.get("score"))
        return r["text"] if "text" in r else json.dumps({"score": s})
    return answer


def parse_critic(arg):
    """NAME=SPEC[@edit|@gen] -> (name, spec, scope)."""
    m = re.fullmatch(r"([A-Za-z0-9._-]+)=(.+?)(?:@(edit|gen|all))?", arg)
    if not m:
        die(f"--critic {arg!r}: expected NAME=PATH_OR_URL[@edit|@gen] (NAME of letters, digits, . _ -)")
    return m.group(1), m.group(2), m.group(3) or "all"


def check_critic(spec, args):
    """None if the critic can run, else a note for the table (a missing model must not crash the run)."""
    if spec.startswith(("http://", "https://", "oracle")) or re.fullmatch(r"constant:[1-5]", spec):
        return None
    if spec == "constant":
        ok = args.sft_dir and all((Path(args.sft_dir) / f"{k}_train.jsonl").is_file() for k in ("edit", "gen"))
        return None if ok else f"needs --sft-dir with edit_train.jsonl and gen_train.jsonl (got {args.sft_dir})"
    if spec.startswith("file:"):
        return None if Path(spec[5:]).is_file() else f"prediction file {spec[5:]} not found"
    return None if (Path(spec) / "config.json").is_file() else f"not found: {spec} (train it first, e.g. train_reward.py)"


def make_scorer(spec, args, device):
    if spec.startswith("oracle"):
        parts = spec.split(":")
        return TextScorer(oracle_answer(float(parts[1]) if len(parts) > 1 else 0.0, parts[2] if len(parts) > 2 else "report"))
    if spec.startswith("constant"):
        const = {m: int(spec[9:]) for m in SPLIT_MODE.values()} if ":" in spec else constant_scores(args.sft_dir)
        return TextScorer(lambda mode, it: json.dumps({"score": [const[mode]]}))
    if spec.startswith("file:"):
        return TextScorer(file_answer(spec[5:]))
    return ModelScorer(spec, args, device)


def fingerprint(path, *extra):
    """What saved outputs depend on: flags/specs (`extra`) and the sizes and times of the weight files at `path`."""
    p, parts = Path(path), [str(path), *extra]
    files = sorted(p.glob("*.safetensors")) + sorted(p.glob("*/*.safetensors")) + [p / "config.json"] if p.is_dir() \
        else [p] if p.is_file() else []
    parts += [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.exists()]
    return hashlib.sha1(json.dumps(parts, default=str).encode()).hexdigest()[:16]


# -----------------------------------------------------------------------------
# critics command: shard, score with resume, merge on rank 0, evaluate, write table + JSON + PNGs


def start_fresh_if_changed(out, fp, rank, what):
    """Resume only outputs made by the same model and flags: otherwise rank 0 clears `out` and starts over."""
    if rank == 0:
        meta = Path(out) / "run.json"
        if meta.is_file() and json.loads(meta.read_text()).get("fingerprint") != fp:
            print0(f"{what} changed since the saved outputs in {out}: starting over")
            shutil.rmtree(out)
        write_json(meta, {"fingerprint": fp})
    dist.barrier()


def predict_all(name, spec, items, args, rank, world, device):
    """Each rank scores its shard (global index % world) of the items not yet predicted; rank 0 merges."""
    pdir = Path(args.out) / "preds" / name
    start_fresh_if_changed(pdir, fingerprint(spec[5:] if spec.startswith("file:") else spec, spec, args.method,
                                             args.samples, args.max_new_tokens), rank, f"[{name}] critic or decoding flags")
    done = {r["key"] for f in sorted(pdir.glob("*.jsonl")) for r in read_jsonl_resumable(f)}
    dist.barrier()  # every rank has read (and repaired) the old files before any rank appends to them
    mine = [it for i, it in enumerate(items) if i % world == rank and it["key"] not in done]
    if mine:
        scorer, chunk = make_scorer(spec, args, device), 4 * args.batch_size  # append every chunk: resumable
        for mode in dict.fromkeys(it["mode"] for it in mine):
            todo = [it for it in mine if it["mode"] == mode]
            for s in range(0, len(todo), chunk):
                for it, j in zip(todo[s:s + chunk], scorer.predict(mode, todo[s:s + chunk])):
                    if j is not None:
                        append_jsonl(pdir / f"part-{rank}.jsonl", {"key": it["key"], "mode": mode, "ok": j.ok, "scores": j.scores,
                                                                   "error": j.error, "text": j.text[:2000]})
                print(f"[{name}] rank {rank}: {mode} {min(s + chunk, len(todo))}/{len(todo)}", flush=True)
    dist.barrier()
    if rank == 0:  # merge: first prediction of each key wins; parts are removed once merged
        merged = {}
        for f in [pdir / "predictions.jsonl"] + sorted(pdir.glob("part-*.jsonl")):
            for r in read_jsonl_resumable(f):
                merged.setdefault(r["key"], r)
        write_jsonl(pdir / "predictions.jsonl", list(merged.values()))
        for f in pdir.glob("part-*.jsonl"):
            f.unlink()
    dist.barrier()
    return pdir / "predictions.jsonl"


def evaluate(items, preds):
    """Metrics per group + confusion matrices per split. preds: key -> {"ok", "scores"} (absent = missing)."""
    def value(it):
        r = preds.get(it["key"])
        return "missing" if r is None else float(r["scores"][0]) if r.get("ok") and r.get("scores") else "fail"
    groups = {"execution": lambda it: it["split"] == "execution", "consistency": lambda it: it["split"] == "consistency",
              "edit_overall": lambda it: it["split"] in ("execution", "consistency"),  # pooled, as the paper
              "gen_easy": lambda it: it["split"] == "gen" and it["difficulty"] == "easy",
              "gen_hard": lambda it: it["split"] == "gen" and it["difficulty"] == "hard",
              "gen_overall": lambda it: it["split"] == "gen"}
    metrics, conf = {}, {}
    for g, sel in groups.items():
        its = [it for it in items if sel(it)]
        if its:
            metrics[g] = group_metrics([it["human_score"] for it in its], [value(it) for it in its])
    for s in ("execution", "consistency", "gen"):
        its = [it for it in items if it["split"] == s]
        if its:
            conf[s] = confusion([it["human_score"] for it in its], [value(it) for it in its])
    return {"metrics": metrics, "confusion": conf}


def confusion_png(path, title, conf):
    """Panels of human (rows) x predicted (columns, last = no score); shade = share of the row."""
    c, pad = 30, 40
    panels = list(conf.items())
    im = Image.new("RGB", (len(panels) * (6 * c + 2 * pad) + pad, 5 * c + 3 * pad), "white")
    d = ImageDraw.Draw(im)
    d.text((pad, 6), title + "   (rows: human 1-5, columns: predicted 1-5, x = no score)", fill="black")
    for k, (split, m) in enumerate(panels):
        x0, y0 = pad + k * (6 * c + 2 * pad), 2 * pad
        d.text((x0, y0 - 16), split, fill="black")
        for r in range(5):
            d.text((x0 - 12, y0 + r * c + 9), str(r + 1), fill="black")
            total = max(1, sum(m[r]))
            for col in range(6):
                share = m[r][col] / total
                shade = (255, int(255 - 180 * share), int(255 - 180 * share)) if col == 5 else \
                        (int(255 - 200 * share), int(255 - 140 * share), 255)
                box = [x0 + col * c, y0 + r * c, x0 + (col + 1) * c - 1, y0 + (r + 1) * c - 1]
                d.rectangle(box, fill=shade, outline=(0, 160, 0) if col == r else (200, 200, 200))
                d.text((box[0] + 4, box[1] + 9), str(m[r][col]), fill="black")
        for col in range(6):
            d.text((x0 + col * c + 11, y0 + 5 * c + 4), "x" if col == 5 else str(col + 1), fill="black")
    im.save(path)


def fmt(v, digits=2):
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def critics_markdown(res):
    cols = [("execution", "exec"), ("consistency", "cons"), ("edit_overall", "edit overall"), ("gen_easy", "gen easy"),
            ("gen_hard", "gen hard"), ("gen_overall", "gen overall")]
    lines = ["| critic | " + " | ".join(f"{c} MAE" for _, c in cols) + " | parse failures | missing | note |",
             "|---" * (len(cols) + 4) + "|"]
    for name, r in res["critics"].items():
        m = r.get("metrics", {})
        n = sum(m[g]["n"] for g in ("edit_overall", "gen_overall") if g in m)
        f = sum(m[g]["failures"] for g in ("edit_overall", "gen_overall") if g in m)
        miss = sum(m[g]["missing"] for g in ("edit_overall", "gen_overall") if g in m)
        lines.append(f"| {name} | " + " | ".join(fmt(m[g]["mae"]) if g in m else "—" for g, _ in cols)
                     + (f" | {f}/{n} ({100 * f / n:.0f}%) | {miss} |" if n else " | — | — |") + f" {r.get('note', '')} |")
    lines += ["", "| critic | MAE (fail=worst) edit / gen | pairwise acc exec / cons / gen | Spearman exec / cons / gen |",
              "|---|---|---|---|"]
    for name, r in res["critics"].items():
        m = r.get("metrics", {})
        g3 = lambda key, gs: " / ".join(fmt(m[g][key]) if g in m else "—" for g in gs)
        lines.append(f"| {name} | {g3('mae_fail_worst', ('edit_overall', 'gen_overall'))} | "
                     f"{g3('pairwise_acc', ('execution', 'consistency', 'gen_overall'))} | "
                     f"{g3('spearman', ('execution', 'consistency', 'gen_overall'))} |")
    lines += ["", "Paper, real FIRM-Bench (MAE; for reference, not comparable with the miniature world):", "",
              "| critic | exec | cons | edit overall | gen |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {fmt(a)} | {fmt(b)} | {fmt(c)} | {fmt(g)} |" for n, a, b, c, g in PAPER]
    lines += ["", "MAE: over items with a parsed score (parse failures and missing predictions are counted beside it). "
              "MAE (fail=worst): every failed or missing item counts max(h-1, 5-h). Edit overall pools the execution "
              "and consistency items. Pairwise accuracy: pairs with different human scores, a tied prediction counts 1/2."]
    return "\n".join(lines) + "\n"


def run_critics(args):
    rank, world, device = setup_dist()
    if not args.critic:
        die("give --critic NAME=PATH_OR_URL (repeatable) or --preset mini")
    items = read_bench(args.bench_dir, args.layout, json.loads(args.field_map) if args.field_map else None, args.limit)
    print0(f"bench {args.bench_dir} ({args.layout}): " + ", ".join(f"{s} {sum(it['split'] == s for it in items)}"
                                                                    for s in SPLIT_MODE) + f" items; {world} rank(s)")
    out, res = Path(args.out), {"bench_dir": str(args.bench_dir), "layout": args.layout, "critics": {}}
    for name, spec, scope in map(parse_critic, args.critic):
        its = [it for it in items if scope == "all" or SPLIT_KIND[it["split"]] == scope]
        note = check_critic(spec, args)
        if note:
            print0(f"[{name}] skipped: {note}")
            res["critics"][name] = {"spec": spec, "note": f"skipped: {note}"}
            continue
        path = predict_all(name, spec, its, args, rank, world, device)
        if rank == 0:
            ev = evaluate(its, {r["key"]: r for r in read_jsonl_resumable(path)})
            res["critics"][name] = {"spec": spec, "scope": scope, "predictions": str(path), **ev,
                                    "note": "" if scope == "all" else f"{scope} splits only"}
            confusion_png(out / f"confusion_{name}.png", name, ev["confusion"])
    if rank == 0:
        write_json(out / "critics.json", res)
        md = critics_markdown(res)
        (out / "critics.md").write_text(md)
        print(md + f"\nwrote {out}/critics.md, critics.json, confusion_*.png", flush=True)
    cleanup_dist()


# -----------------------------------------------------------------------------
# policy command: generate with fixed seeds, judge independently, base vs tuned


def policy_judge(spec, kind, device):
    """-> fn(records, images) -> list of score in [0, 1] or None (a critic answer that did not parse)."""
    import toy
    S = toy.Scene.from_dict
    if spec == "pixel":
        if kind == "gen":
            return lambda recs, ims: [toy.pixel_judge_gen(im, S(r["toy"]["scene"]))["overall"] for r, im in zip(recs, ims)]
        return lambda recs, ims: [toy.pixel_judge_edit(im, S(r["toy"]["scene"]), S(r["toy"]["target_scene"]))["overall"]
                                  for r, im in zip(recs, ims)]
    import reward
    critic = reward.RewardClient(spec[7:]) if spec[7:].startswith("http") else reward.Critic(spec[7:], device=device)
    if kind == "gen":  # QMA, the paper's gen reward
        return lambda recs, ims: reward.gen_rewards(critic, [{"image": im, "prompt": r["prompt"], "requirement": r.get("requirement")}
                                                             for r, im in zip(recs, ims)], fusion="qma")[0]
    return lambda recs, ims: reward.edit_rewards(critic, [{"source": r["_src"], "edited": im, "instruction": r["prompt"],
                                                           "requirement": r.get("requirement")} for r, im in zip(recs, ims)], fusion="cme")[0]


def run_policy(args):
    rank, world, device = setup_dist()
    if not args.judge == "pixel" and not args.judge.startswith("critic:"):
        die(f"--judge {args.judge!r}: expected 'pixel' or 'critic:PATH_OR_URL'")
    recs = read_jsonl(args.prompts, required=("id", "prompt"))[:args.limit]
    K, base_dir = args.samples_per_prompt, Path(args.prompts).parent
    jobs = [(i * K + k, r, k) for i, r in enumerate(recs) for k in range(K)]  # global index -> seed
    tag = "pixel" if args.judge == "pixel" else "critic-" + Path(args.judge[7:].rstrip("/")).name
    out = Path(args.out or f"runs/mini/bench/policy_{args.kind}_{tag}")
    if args.judge == "pixel" and any("toy" not in r for r in recs):
        die(f"{args.prompts}: --judge pixel needs the miniature world's 'toy' field in every record; use --judge critic:PATH")
    start_fresh_if_changed(out, fingerprint(args.tuned, args.base, args.kind, args.judge, args.seed, K, args.steps), rank,
                           "the policy, judge, seeds or steps")
    done = {v: {r["uid"] for f in out.glob(f"scores-{v}-*.jsonl") for r in read_jsonl_resumable(f)} for v in ("base", "tuned")}
    dist.barrier()  # every rank has read (and repaired) the old files before any rank appends to them
    judge = policy_judge(args.judge, args.kind, device)
    for variant, lora in (("base", None), ("tuned", args.tuned)):
        mine = [j for j in jobs if j[0] % world == rank and f"{j[1]['id']}#{j[2]}" not in done[variant]]
        if not mine:
            continue
        if args.kind == "gen":
            import rl_gen
            model = rl_gen.load_generator(args.base, lora_dir=lora, device=device)
        else:
            import rl_edit
            model = rl_edit.load_editor(args.base, lora_dir=lora, device=device)
        (out / "images" / variant).mkdir(parents=True, exist_ok=True)
        for s in range(0, len(mine), args.batch_size):
            chunk = mine[s:s + args.batch_size]
            rs, seeds = [dict(r) for _, r, _ in chunk], [args.seed + g for g, _, _ in chunk]
            if args.kind == "gen":
                ims = rl_gen.generate(model, [r["prompt"] for r in rs], seeds, steps=args.steps or 10)
            else:
                for r in rs:
                    r["_src"] = load_image(r["image"], base_dir)
                ims = rl_edit.edit(model, [r["_src"] for r in rs], [r["prompt"] for r in rs], seeds, steps=args.steps or 6)
            for (g, r, k), im, sc in zip(chunk, ims, judge(rs, ims)):
                im.save(out / "images" / variant / f"{r['id']}_{k}.png")
                append_jsonl(out / f"scores-{variant}-{rank}.jsonl", {"uid": f"{r['id']}#{k}", "id": r["id"], "sample": k,
                                                                      "seed": args.seed + g, "score": sc})
        print(f"{variant}: rank {rank} did {len(mine)} samples", flush=True)
        del model
    dist.barrier()
    if rank == 0:
        policy_summary(args, recs, out, base_dir)
    cleanup_dist()


def policy_summary(args, recs, out, base_dir):
    scores = {v: {r["uid"]: r["score"] for f in sorted(out.glob(f"scores-{v}-*.jsonl")) for r in read_jsonl_resumable(f)}
              for v in ("base", "tuned")}
    res = {"kind": args.kind, "judge": args.judge, "base": args.base, "tuned": args.tuned, "prompts": args.prompts,
           "samples_per_prompt": args.samples_per_prompt, "seed": args.seed, "variants": {}}
    for v, sc in scores.items():
        good = [s for s in sc.values() if s is not None]
        m, ci = mean_ci(good)
        res["variants"][v] = {"n": len(sc), "failures": len(sc) - len(good), "mean": m, "ci95": ci}
    both = [scores["tuned"][u] - scores["base"][u] for u in scores["base"] if scores["base"][u] is not None
            and scores["tuned"].get(u) is not None]
    m, ci = mean_ci(both)  # paired by prompt and seed: the CI of the gain is tighter than of either mean
    res["tuned_minus_base"] = {"n": len(both), "mean": m, "ci95": ci}
    write_json(out / "policy.json", res)
    rows = []
    for r in recs[:args.grid_rows]:  # source | base | tuned (and the exact target in the miniature world)
        p = f"{r['id']}_0.png"
        cells = [load_image(r["image"], base_dir)] if args.kind == "edit" else []
        if "toy" in r:
            import toy
            cells.append(toy.render(toy.Scene.from_dict(r["toy"].get("target_scene", r["toy"]["scene"])), 64))
        cells += [load_image(out / "images" / v / p) for v in ("base", "tuned") if (out / "images" / v / p).is_file()]
        rows.append([c.resize((128, 128), Image.NEAREST) for c in cells])
    if rows:
        image_grid(rows).save(out / "grid.png")
    cols = ("source | " if args.kind == "edit" else "") + ("target | " if recs and "toy" in recs[0] else "") + "base | tuned"
    md = [f"# Policy evaluation ({args.kind}, judge {args.judge})", "",
          f"{len(recs)} prompts x {args.samples_per_prompt} seeds (seed = {args.seed} + global index, the same for base "
          "and tuned). Mean +- 1.96 std/sqrt(n); the gain is paired per prompt and seed.", "",
          "| policy | n | mean score | 95% CI | judge failures |", "|---|---|---|---|---|"]
    pm = lambda ci: "—" if math.isnan(ci) else f"+-{ci:.3f}"
    md += [f"| {v} | {x['n']} | {fmt(x['mean'], 3)} | {pm(x['ci95'])} | {x['failures']} |" for v, x in res["variants"].items()]
    d = res["tuned_minus_base"]
    md += [f"| tuned - base | {d['n']} | {fmt(d['mean'], 3)} | {pm(d['ci95'])} | |", "", f"![grid ({cols})](grid.png)", ""]
    (out / "policy.md").write_text("\n".join(md))
    print("\n".join(md), flush=True)


# -----------------------------------------------------------------------------
# report command: gather the pipeline's outputs into one Markdown page


def run_report(args):
    root = Path(args.root)
    (root / "report").mkdir(parents=True, exist_ok=True)
    md = ["# FIRM miniature pipeline report", "", "Generated by `python bench.py report --preset mini`; sections whose "
          "inputs are missing say which command makes them.", "", "## 1. Critics on the miniature FIRM-Bench", ""]
    crit = root / "bench" / "critics.md"
    if crit.is_file():
        md += [crit.read_text(), "Confusion matrices: " + ", ".join(f"[{p.stem[10:]}](bench/{p.name})"
                                                                   for p in sorted((root / "bench").glob("confusion_*.png"))), ""]
    else:
        md += ["_missing: run `python bench.py critics --preset mini`_", ""]
    md += ["## 2. RL runs (training reward as logged; held-out evaluation from eval.jsonl when present)", ""]
    runs = [d for d in sorted(root.glob("rl_gen*")) + sorted(root.glob("rl_edit*")) if (d / "metrics.jsonl").is_file()]
    if not runs:
        md += ["_missing: no runs/mini/rl_gen*/metrics.jsonl or rl_edit*/metrics.jsonl (run rl_gen.py / rl_edit.py)_", ""]
    else:
        md += ["| run | log rows | reward first | reward last (mean of last 10%) | held-out eval first -> last | curve |",
               "|---|---|---|---|---|---|"]
    for d in runs:  # rl_gen logs held-out numbers to eval.jsonl, rl_edit as eval_* columns of metrics.jsonl
        rows = read_jsonl_resumable(d / "metrics.jsonl")
        rows_all = rows + read_jsonl_resumable(d / "eval.jsonl")
        series = lambda k: [(r.get("step", i), r[k]) for i, r in enumerate(rows_all) if isinstance(r.get(k), (int, float))]
        keys = sorted({k for r in rows_all for k in r if any(w in k for w in ("reward", "judge", "pixel"))
                       and not k.endswith("_std") and series(k)})
        png = root / "report" / f"{d.name}_reward.png"
        plot_curves(png, {k: series(k) for k in keys}, title=f"{d.name}: reward and held-out judge")
        vals = [y for _, y in series("reward")]
        held = "; ".join(f"{k} {fmt(series(k)[0][1], 3)} -> {fmt(series(k)[-1][1], 3)}" for k in
                         [k for k in ("eval_reward", "eval_judge", "eval_pixel", "eval_fail", "eval_parse_failures") if series(k)][:3])
        md.append(f"| {d.name} | {len(rows)} | {fmt(vals[0], 3) if vals else '—'} | "
                  f"{fmt(float(np.mean(vals[-max(1, len(vals) // 10):])), 3) if vals else '—'} | {held or '—'} | "
                  f"![{d.name}](report/{png.name}) |")
    md += ["", "## 3. Policies on held-out prompts (independent judge)", ""]
    evals = sorted((root / "bench").glob("policy*/policy.md"))
    md += [p.read_text().replace("](grid.png)", f"]({p.parent.relative_to(root)}/grid.png)").replace("# Policy", "### Policy")
           for p in evals] or ["_missing: run `python bench.py policy --kind gen|edit ... --judge pixel`_", ""]
    (root / "REPORT.md").write_text("\n".join(md) + "\n")
    print(f"wrote {root / 'REPORT.md'} ({'critics ' if crit.is_file() else ''}{len(runs)} RL run(s), {len(evals)} policy eval(s))")


# -----------------------------------------------------------------------------
# CLI


def get_args(argv=None):
    ap = argparse.ArgumentParser(description="FIRM-Bench for critics, policy evaluation, report")
    sub = ap.add_subparsers(dest="cmd", required=True)
    fmt_ = argparse.ArgumentDefaultsHelpFormatter
    c, p, r = (sub.add_parser(n, formatter_class=fmt_) for n in ("critics", "policy", "report"))
    for q in (c, p, r):
        q.add_argument("--preset", default=None, choices=sorted(PRESETS), help="the miniature world's paths and critics")
    # critics: bench
    c.add_argument("--bench-dir", default=None, help="bench directory (see --layout)")
    c.add_argument("--layout", default="mini", choices=sorted(LAYOUTS), help="file names and fields of the bench")
    c.add_argument("--field-map", default=None, help='JSON {"[split.]field": "dotted.path"} overriding the layout\'s fields')
    c.add_argument("--limit", type=int, default=None, help="items per split (quick runs)")
    # critics: critics and decoding
    c.add_argument("--critic", action="append", default=None,
                   help="NAME=SPEC[@edit|@gen]; SPEC = model dir | http://server | file:preds.jsonl | constant[:k] | oracle:noise[:report|direct]")
    c.add_argument("--sft-dir", default=None, help="SFT files whose mean score the 'constant' baseline predicts")
    c.add_argument("--method", default="generate", choices=["generate", "expected"], help="critic scoring method")
    c.add_argument("--samples", type=int, default=1, help="self-ensemble size (generate only)")
    c.add_argument("--max-new-tokens", type=int, default=None, help="tokens per critic answer (default 256; mini 160)")
    c.add_argument("--batch-size", type=int, default=16, help="items per critic batch")
    c.add_argument("--out", default=None, help="output directory (critics.md, critics.json, confusion_*.png, preds/)")
    # policy
    p.add_argument("--kind", required=True, choices=["gen", "edit"])
    p.add_argument("--base", required=True, help="policy model directory (gen: SD3-style, edit: Qwen-Image-Edit-style)")
    p.add_argument("--tuned", required=True, help="LoRA directory of the tuned policy")
    p.add_argument("--prompts", required=True, help="held-out JSONL {id, prompt[, image, toy]} (e.g. runs/mini/data/rl/gen_test.jsonl)")
    p.add_argument("--judge", default="pixel", help="'pixel' (miniature world) or critic:PATH_OR_URL (QMA for gen, CME for edit)")
    p.add_argument("--samples-per-prompt", type=int, default=4, help="seeds per prompt")
    p.add_argument("--seed", type=int, default=1000, help="seed of global sample 0")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 10 gen, 6 edit: as in RL)")
    p.add_argument("--batch-size", type=int, default=16, help="samples per generation batch")
    p.add_argument("--limit", type=int, default=None, help="prompts to use (default all)")
    p.add_argument("--grid-rows", type=int, default=8, help="prompts shown in grid.png")
    p.add_argument("--out", default=None, help="output directory (default runs/mini/bench/policy_<kind>_<judge>)")
    # report
    r.add_argument("--root", default="runs/mini", help="pipeline root to gather")
    for q in (c, p, r):
        q.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = ap.parse_args(argv)
    if args.preset:  # the preset fills what the user did not give
        for k, v in PRESETS[args.preset].get(args.cmd, {}).items():
            if getattr(args, k) is None:
                setattr(args, k, v)
    if args.cmd == "critics":
        args.max_new_tokens = args.max_new_tokens or 256
    if args.cmd == "critics" and not (args.bench_dir and args.out):
        ap.error("critics needs --bench-dir and --out (or --preset mini)")
    return args


def main(argv=None):
    args = get_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        {"critics": run_critics, "policy": run_policy, "report": run_report}[args.cmd](args)
    except DataError as e:
        die(str(e))


if __name__ == "__main__":
    main()
