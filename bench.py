"""FIRM-Bench for critics (Sec 3.3) and held-out evaluation of the RL-tuned policies (Sec 4).

critics: every critic scores every bench item; the paper's metric is the MAE between the critic's integer score
and the human score: edit execution, consistency and overall (POOLED over the items of both, not the mean of the
two MAEs), gen easy, hard and overall. A critic is NAME=SPEC[@edit|@gen], SPEC any reward.open_critic spec (a
model directory, an endpoint http://host:port/v1[#served-name], a factory package.module:name) or a baseline
(constant: the SFT files' mean score; constant:k; file:preds.jsonl, predictions made elsewhere).

    python bench.py critics --bench-dir /data/FIRM-Bench --layout firm-release --out runs/bench \\
        --critic FIRM-Edit-8B=/ckpt/FIRM-Edit-8B@edit --critic served=http://10.0.0.5:8000/v1#firm-gen@gen
    torchrun --standalone --nproc_per_node=8 bench.py critics ...   # each rank scores its shard

policy: held-out prompts, one fixed seed per sample, the same seeds for every policy (so they differ only by
their weights), scored by a judge that did NOT train them (--judge SPEC) with the paper's fusion: QMA for gen,
CME for edit (its parts, execution and consistency, beside it); gains over the base paired per prompt and seed.

    python bench.py policy --kind edit --base /ckpt/Qwen-Image-Edit-2509 --tuned firm=runs/rl_edit \\
        --prompts edits.jsonl --judge /ckpt/FIRM-Edit-8B --out runs/policy_edit

--preset mini: the miniature world's paths, critics and judge (PRESETS). Both commands resume: each rank appends
per item, rank 0 merges, a rerun does only what is missing, a changed critic or policy (weights, decoding or
sampling flags) starts over. Failures are never dropped: "MAE" is over parsed scores, with the failure and
missing counts beside it; "MAE (fail=worst)" charges a failed or missing item max(h - 1, 5 - h).

Bench layouts (--layout): "mini" is what curate.py writes (edit_execution.jsonl, edit_consistency.jsonl,
gen.jsonl; image paths relative to the bench dir). "firm-release" reads the released FIRM-Bench
(FIRM-Bench-{Edit,Gen}/bench_v1.jsonl joined by id with result/human_bench_v1.jsonl); the gen fields follow the
release's gen_mae.py (image a list, "en/..." easy, "en_long/..." hard; instruction_following.score[0]). The edit
fields and the prompt field are ASSUMPTIONS (edit_mae.py was not readable offline): fix them with
--field-map '{"execution.human_score": "exec.score.0", "instruction": "edit_prompt"}' (dotted paths, numbers
index lists, a key without a split prefix applies to every split). A missing field is an error naming it.

Departures from the paper:
  1. The paper reports MAE only (parse failures cannot occur in its table). We add the failure-aware MAE,
     pairwise accuracy (pairs with different human scores), Spearman and confusion matrices.
  2. Pairwise accuracy gives a tied prediction half credit (integer critics tie often); peers differ.
"""

import argparse
import importlib.util
import json
import math
import re
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

import reward
from common import (append_jsonl, check_field, check_image, cleanup_dist, confusion_png, DataError, die, fingerprint,
                    image_grid, load_image, note_outside, print0, read_manifest, read_parts, read_records,
                    setup_dist, start_fresh_if_changed, write_json, write_jsonl)

SPLIT_MODE = {"execution": "execution", "consistency": "consistency", "gen": "instruction"}
M = "runs/mini"
PRESETS = {"mini": {  # the miniature world (toy/): what curate.py, train_reward.py and the RL scripts write there
    "critics": dict(bench_dir=f"{M}/data/bench", out=f"{M}/bench", sft_dir=f"{M}/data/sft", max_new_tokens=192,
                    critic=[f"edit-critic={M}/models/edit-critic@edit", f"gen-critic={M}/models/gen-critic@gen",
                            f"edit-critic-direct={M}/models/edit-critic-direct@edit",
                            f"gen-critic-direct={M}/models/gen-critic-direct@gen",
                            f"critic-base={M}/models/critic-base", "constant=constant",
                            "oracle-noisy=toy.oracle:noisy", "oracle-direct=toy.oracle:direct"]),
    # the world's exact pixel judge; the RL scripts save their LoRA in their --out directory
    "policy gen": dict(base=f"{M}/models/gen-base", prompts=f"{M}/data/rl/gen_test.jsonl", judge="toy.judges:pixel",
                       critics=[f"gen-critic={M}/models/gen-critic", f"gen-critic-direct={M}/models/gen-critic-direct"],
                       max_new_tokens=256, out=f"{M}/bench/policy_gen_pixel",
                       tuned=[f"qma={M}/rl_gen", f"direct={M}/rl_gen_direct", f"pixel={M}/rl_gen_pixel"]),
    "policy edit": dict(base=f"{M}/models/edit-base", prompts=f"{M}/data/rl/edit_test.jsonl", judge="toy.judges:pixel",
                        critics=[f"edit-critic={M}/models/edit-critic"], max_new_tokens=192, out=f"{M}/bench/policy_edit_pixel",
                        tuned=[f"cme={M}/rl_edit_cme", f"sum55={M}/rl_edit_sum55"])}}
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
    """1-based ranks; ties share the mean of the ranks they span, (#smaller + #smaller-or-equal + 1) / 2."""
    s = np.sort(np.asarray(x, float))
    return (np.searchsorted(s, x, "left") + np.searchsorted(s, x, "right") + 1) / 2


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
    # a failure costs the largest error any prediction in 1..5 can make for human score h
    worst = [max(h - 1, 5 - h) if isinstance(p, str) else abs(p - h) for h, p in zip(human, pred)]
    return {"n": len(human), "parsed": len(ok), "failures": pred.count("fail"), "missing": pred.count("missing"),
            "mae": mae(ps, hs), "mae_fail_worst": float(np.mean(worst)) if worst else float("nan"),
            "pairwise_acc": pairwise_accuracy(ps, hs), "spearman": spearman(ps, hs)}


def confusion(human, pred):
    """5 x 6 counts: row = human score 1..5, column = rounded prediction 1..5, last column = no score."""
    m = np.zeros((5, 6), int)
    for h, p in zip(human, pred):
        m[int(h) - 1, 5 if isinstance(p, str) else int(min(5, max(1, round(p)))) - 1] += 1
    return m.tolist()


# -----------------------------------------------------------------------------
# bench reader: one adapter, field paths per layout (see the docstring)

MINI_EDIT = {k: k for k in ("id", "source", "edited", "instruction", "human_score")}
RELEASE_EDIT = dict(file="FIRM-Bench-Edit/bench_v1.jsonl", scores="FIRM-Bench-Edit/result/human_bench_v1.jsonl",
                    root="FIRM-Bench-Edit", skip_unscored=True)  # assumed: a row carries the score(s) it was rated for
LAYOUTS = {
    "mini": [dict(split="execution", file="edit_execution.jsonl", fields=MINI_EDIT),
             dict(split="consistency", file="edit_consistency.jsonl", fields=MINI_EDIT),
             dict(split="gen", file="gen.jsonl",
                  fields={k: k for k in ("id", "image", "prompt", "human_score", "difficulty")})],
    "firm-release": [
        dict(split=s, **RELEASE_EDIT, fields={"id": "id", "source": "image.0", "edited": "image.1",
                                              "instruction": "prompt", "human_score": f"{s}.score.0"})
        for s in ("execution", "consistency")] + [
        dict(split="gen", file="FIRM-Bench-Gen/bench_v1.jsonl", scores="FIRM-Bench-Gen/result/human_bench_v1.jsonl",
             root="FIRM-Bench-Gen", difficulty_by_prefix={"en/": "easy", "en_long/": "hard"},
             fields={"id": "id", "image": "image.0", "prompt": "prompt",
                     "human_score": "instruction_following.score.0"})]}
KNOWN_FIELDS = {"id", "source", "edited", "instruction", "image", "prompt", "difficulty", "human_score"}
BENCH_FIELDS = {"id": "id", "source": "image?", "edited": "image?", "image": "image?", "instruction": "text?",
                "prompt": "text?"}  # (common.FIELD_KINDS) which of them a split needs, its layout says
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


def read_bench(bench_dir, layout="mini", field_map=None, limit=None, check_images=False):
    """Items {key, split, mode, id, human_score, root, record (the row), source/edited/instruction | image/prompt/difficulty}.
    Every field's type is checked; with check_images (a critic that looks at the pixels) also that every image is
    there and decodes, before anything is scored."""
    bench_dir, items = Path(bench_dir), []
    if layout not in LAYOUTS:
        raise DataError(f"unknown layout {layout!r}; expected one of {sorted(LAYOUTS)}")
    for spec in LAYOUTS[layout]:
        split, path, fields = spec["split"], bench_dir / spec["file"], dict(spec["fields"])
        for k, v in (field_map or {}).items():  # "field" applies everywhere, "split.field" to one split
            s, _, f = k.rpartition(".")
            if s not in ("", *SPLIT_MODE) or f not in KNOWN_FIELDS:
                raise DataError(f"--field-map key {k!r}: expected [split.]field, split in {list(SPLIT_MODE)}, "
                                f"field in {sorted(KNOWN_FIELDS)}")
            if s in ("", split) and (f in fields or f == "difficulty" and split == "gen"):
                fields[f] = v
        scores = {}  # the release keeps the human scores in a second file, joined by id
        if spec.get("scores") and (bench_dir / spec["scores"]).is_file():
            scores = {str(get_path(r, fields["id"])): r for _, r in read_records(bench_dir / spec["scores"])}
        seen, rows, images = set(), [], []
        for n, raw in read_records(path):
            row = {**raw, **scores.get(str(get_path(raw, fields["id"])), {})}
            if spec.get("skip_unscored") and get_path(row, fields["human_score"]) is _MISSING:
                continue
            item = {"split": split, "mode": SPLIT_MODE[split], "root": str(bench_dir / spec.get("root", ""))}
            for name, fpath in fields.items():
                item[name] = get_path(row, fpath)
                if item[name] is _MISSING:
                    raise DataError(f"{path}:{n}: missing field '{name}' (looked for '{fpath}'"
                                    f"{' here and in ' + spec['scores'] if spec.get('scores') else ''}); "
                                    f"map it with --field-map '{{\"{split}.{name}\": \"...\"}}'")
            for name, kind in BENCH_FIELDS.items():
                found = check_field(item, name, kind, f"{path}:{n}")  # the image paths it holds
                for image in found if check_images else []:
                    check_image(Path(item["root"]) / image, True, f"{path}:{n}: field '{name}' ('{fields[name]}')")
                    images.append(Path(item["root"]) / image)
            h = item["human_score"]
            if isinstance(h, bool) or not isinstance(h, (int, float)) or not 1 <= h <= 5:
                raise DataError(f"{path}:{n}: field 'human_score' ('{fields['human_score']}') = {h!r} "
                                "is not a score in 1..5")
            if split == "gen" and "difficulty" not in item:
                item["difficulty"] = next((d for p, d in spec.get("difficulty_by_prefix", {}).items()
                                           if str(item["image"]).startswith(p)), "unknown")
            if item["id"] in seen:
                raise DataError(f"{path}:{n}: field 'id' ('{fields['id']}'): duplicate {item['id']!r}")
            seen.add(item["id"])
            item["key"] = f"{split}/{item['id']}"
            rows.append({**item, "record": row})  # what a critic that knows the answer (a world's) reads
        if not rows:
            raise DataError(f"{path}: no item of split '{split}' (field '{fields['human_score']}' found in no row)")
        note_outside(path, images, bench_dir)
        items += rows[:limit]
    return items


# -----------------------------------------------------------------------------
# critics: any reward.open_critic spec, or a baseline (a constant, a prediction file)


def parse_critic(arg, sft_dir):
    """NAME=SPEC[@edit|@gen] -> (name, spec, scope, note): note says why the critic cannot run (None if it
    can), so that a critic not trained yet becomes a row saying so, not a crash of the whole table."""
    m = re.fullmatch(r"([A-Za-z0-9._-]+)=(.+?)(?:@(edit|gen|all))?", arg)
    if not m:
        die(f"--critic {arg!r}: expected NAME=SPEC[@edit|@gen] (NAME of letters, digits, . _ -)")
    spec, note = m.group(2), None
    if spec == "constant":
        if not (sft_dir and all((Path(sft_dir) / f"{k}_train.jsonl").is_file() for k in ("edit", "gen"))):
            note = f"needs --sft-dir with edit_train.jsonl and gen_train.jsonl (got {sft_dir})"
    elif spec.startswith("file:"):
        note = None if Path(spec[5:]).is_file() else f"prediction file {spec[5:]} not found"
    elif reward.is_factory(spec):  # package.module:name, imported when the critic is opened
        note = None if importlib.util.find_spec(spec.split(".")[0].split(":")[0]) else f"no Python package for {spec}"
    elif not (spec.startswith(("http://", "https://")) or re.fullmatch(r"constant:[1-5]", spec)):
        if not (Path(spec) / "config.json").is_file():
            note = f"not found: {spec} (train it first, e.g. train_reward.py)"
    return m.group(1), spec, m.group(3) or "all", note


def is_baseline(spec):
    """The baselines answer without the images; every other critic is handed them."""
    return spec.startswith(("constant", "file:"))


def constant_scores(sft_dir):
    """The training-set mean score per mode, rounded: the best constant predictor one can know in advance."""
    out = {}
    for kind in ("edit", "gen"):
        for r in read_manifest(Path(sft_dir) / f"{kind}_train.jsonl", {"mode": "str", "score": "scores"}):
            if not isinstance(r["score"], list):
                out.setdefault(r["mode"], []).append(r["score"])
    return {m: int(round(float(np.mean(v)))) for m, v in out.items()}


def make_scorer(spec, args, device):
    """-> predict(mode, items) -> one reward.Judgement per item, None where there is no prediction. The
    baselines write an answer TEXT that goes through the same parser as a model's answer."""
    if spec.startswith("constant"):
        const = {m: int(spec[9:]) for m in SPLIT_MODE.values()} if ":" in spec else constant_scores(args.sft_dir)
        answer = lambda mode, it: json.dumps({"score": [const[mode]]})
    elif spec.startswith("file:"):  # predictions made elsewhere; an id absent from the file is 'missing'
        rows = {(r.get("mode"), str(r["id"])): r for r in read_manifest(spec[5:], {"id": "id", "mode": "str?"}, unique=None)}

        def answer(mode, it):
            r = rows.get((mode, str(it["id"]))) or rows.get((None, str(it["id"])))
            if r is None:
                return None
            return r["text"] if "text" in r else json.dumps({"score": r.get("scores", r.get("score"))})
    else:  # a model directory, an endpoint or a factory: the images, the text and the bench row ("record")
        critic = reward.open_critic(spec, device=device, prompt_file=args.prompt_file, max_new_tokens=args.max_new_tokens,
                                    batch_size=args.batch_size)

        def predict(mode, items):
            keys = ("image",) if mode == "instruction" else ("source", "edited")
            pil = [{**{k: load_image(it[k], it["root"]) for k in keys}, "instruction": it.get("instruction"),
                    "prompt": it.get("prompt"), "requirement": it.get("requirement"), "record": it["record"]}
                   for it in items]
            return critic.score(mode, pil, method=args.method, samples=args.samples)
        return predict

    def judged(text, mode):
        p = reward.parse_score(text, reward.N_SCORES[mode], mode)
        return reward.Judgement(p.scores, text, p.ok, p.error, p.how)
    return lambda mode, items: [None if t is None else judged(t, mode) for t in (answer(mode, it) for it in items)]


# -----------------------------------------------------------------------------
# critics command: shard, score with resume, merge on rank 0, evaluate, write table + JSON + PNGs

GROUPS = {"execution": (["execution"], None), "consistency": (["consistency"], None),
          "edit_overall": (["execution", "consistency"], None),  # pooled over the items of both, as the paper
          "gen_easy": (["gen"], "easy"), "gen_hard": (["gen"], "hard"), "gen_overall": (["gen"], None)}


def predict_all(name, spec, items, args, rank, world, device):
    """Each rank scores its shard (global index % world) of the items not yet predicted; rank 0 merges."""
    pdir = Path(args.out) / "preds" / name
    fp = fingerprint(spec[5:] if spec.startswith("file:") else spec, spec, args.method, args.samples,
                     args.max_new_tokens, args.prompt_file and fingerprint(args.prompt_file))
    start_fresh_if_changed(pdir, fp, rank, f"[{name}] critic or decoding flags")
    done = read_parts([pdir / "predictions.jsonl"] + sorted(pdir.glob("part-*.jsonl")), "key")
    dist.barrier()  # every rank has read (and repaired) the old files before any rank appends to them
    mine = [it for i, it in enumerate(items) if i % world == rank and it["key"] not in done]
    predict = make_scorer(spec, args, device) if mine else None  # load a model only when there is work
    chunk = 4 * args.batch_size  # predictions are appended per chunk: a killed run loses at most one chunk
    for mode in dict.fromkeys(it["mode"] for it in mine):
        todo = [it for it in mine if it["mode"] == mode]
        for s in range(0, len(todo), chunk):
            for it, j in zip(todo[s:s + chunk], predict(mode, todo[s:s + chunk])):
                if j is not None:
                    append_jsonl(pdir / f"part-{rank}.jsonl", {"key": it["key"], "mode": mode, "ok": j.ok, "scores":
                                                               j.scores, "error": j.error, "text": j.text[:2000]})
            print(f"[{name}] rank {rank}: {mode} {min(s + chunk, len(todo))}/{len(todo)}", flush=True)
    dist.barrier()  # every rank's part is complete before rank 0 merges them
    if rank == 0:  # merge; parts are removed once merged
        parts = sorted(pdir.glob("part-*.jsonl"))
        write_jsonl(pdir / "predictions.jsonl", list(read_parts([pdir / "predictions.jsonl"] + parts, "key").values()))
        for f in parts:
            f.unlink()
    dist.barrier()  # no rank reads predictions.jsonl before rank 0 has written it
    return pdir / "predictions.jsonl"


def evaluate(items, preds):
    """Metrics per group + a confusion matrix per split. preds: key -> {"ok", "scores"} (absent = missing)."""
    def value(it):
        r = preds.get(it["key"])
        return "missing" if r is None else float(r["scores"][0]) if r.get("ok") and r.get("scores") else "fail"
    metrics, conf = {}, {}
    for g, (splits, difficulty) in GROUPS.items():
        its = [it for it in items if it["split"] in splits and difficulty in (None, it.get("difficulty"))]
        if its:
            human, pred = [it["human_score"] for it in its], [value(it) for it in its]
            metrics[g] = group_metrics(human, pred)
            if len(splits) == 1 and difficulty is None:
                conf[splits[0]] = confusion(human, pred)
    origin = lambda it: (it.get("record") or {}).get("origin", "simulated")  # simulated candidates, or a policy's samples
    origins = sorted({origin(it) for it in items})
    by_origin = {}
    for o in origins if len(origins) > 1 else []:  # pooled above; apart here when the bench mixes them
        for g in ("edit_overall", "gen_overall"):
            splits = GROUPS[g][0]
            its = [it for it in items if it["split"] in splits and origin(it) == o]
            if its:
                by_origin[f"{g}[{o}]"] = group_metrics([it["human_score"] for it in its], [value(it) for it in its])
    return {"metrics": metrics, "by_origin": by_origin, "confusion": conf}


def release_gen_records(items, preds):
    """The gen predictions in the release's own schema, so its scoring script (gen_mae.py) reads them: the bench
    record with the critic's score filled in, {"id", "image": [path], "prompt", "instruction_following": {"score":
    [n]}}; easy / hard follow from the path ("en/" / "en_long/"). Items without a score are left out (counted)."""
    scored = [(it, preds[it["key"]]["scores"][0]) for it in items if it["split"] == "gen"
              and preds.get(it["key"], {}).get("ok") and preds[it["key"]].get("scores")]
    return [{"id": it["id"], "image": [it["image"]], "prompt": it["prompt"],
             "instruction_following": {"score": [int(s) if float(s).is_integer() else s]}} for it, s in scored]


def fmt(v, digits=2):
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def critics_markdown(res):
    cols = {"execution": "exec", "consistency": "cons", "edit_overall": "edit overall", "gen_easy": "gen easy",
            "gen_hard": "gen hard", "gen_overall": "gen overall"}
    three = ("execution", "consistency", "gen_overall")
    main = ["| critic | " + " | ".join(f"{c} MAE" for c in cols.values()) + " | parse failures | missing | note |",
            "|---" * (len(cols) + 4) + "|"]
    more = ["| critic | MAE (fail=worst) edit / gen | pairwise acc exec / cons / gen | Spearman exec / cons / gen |",
            "|---|---|---|---|"]
    for name, r in res["critics"].items():
        m = r.get("metrics", {})
        cells = lambda key, gs, sep: sep.join(fmt(m[g][key]) if g in m else "—" for g in gs)
        n, f, miss = (sum(m[g][k] for g in ("edit_overall", "gen_overall") if g in m)
                      for k in ("n", "failures", "missing"))
        counts = f"{f}/{n} ({100 * f / n:.0f}%) | {miss}" if n else "— | —"
        main.append(f"| {name} | {cells('mae', cols, ' | ')} | {counts} | {r.get('note', '')} |")
        more.append(f"| {name} | {cells('mae_fail_worst', ('edit_overall', 'gen_overall'), ' / ')} | "
                    f"{cells('pairwise_acc', three, ' / ')} | {cells('spearman', three, ' / ')} |")
    origins = sorted({k[k.index("[") + 1:-1] for r in res["critics"].values() for k in r.get("by_origin", {})},
                     key=lambda o: (o != "simulated", o))
    apart = []
    if origins:  # the bench mixes simulated candidates and the policies' own samples: each on its own too
        apart = ["By origin of the candidates (MAE):", "", "| critic | " + " | ".join(
                 f"{g} {o}" for g in ("edit overall", "gen overall") for o in origins) + " |", "|---" * (1 + 2 * len(origins)) + "|"]
        for name, r in res["critics"].items():
            bo = r.get("by_origin", {})
            apart.append(f"| {name} | " + " | ".join(fmt(bo[k]["mae"]) if (k := f"{g}[{o}]") in bo else "—"
                                                    for g in ("edit_overall", "gen_overall") for o in origins) + " |")
        apart.append("")
    paper = ["Paper, real FIRM-Bench (MAE; for reference, not comparable with another bench):", "",
             "| critic | exec | cons | edit overall | gen |", "|---|---|---|---|---|"]
    paper += [f"| {n} | {fmt(a)} | {fmt(b)} | {fmt(c)} | {fmt(g)} |" for n, a, b, c, g in PAPER]
    note = ("MAE: over items with a parsed score (parse failures and missing predictions are counted beside it). "
            "MAE (fail=worst): every failed or missing item counts max(h-1, 5-h). Edit overall pools the execution "
            "and consistency items. Pairwise accuracy: pairs with different human scores, a tied prediction "
            "counts 1/2.")
    return "\n".join(main + [""] + more + [""] + apart + paper + ["", note]) + "\n"


def run_critics(args):
    rank, world, device = setup_dist()
    critics = [parse_critic(c, args.sft_dir) for c in args.critic]
    for name, _, _, note in critics:
        if note and not args.preset_critics:  # a critic the user named must run; the preset's may not exist yet
            raise DataError(f"--critic {name}: {note}")
    looks = any(note is None and not is_baseline(spec) for _, spec, _, note in critics)
    items = read_bench(args.bench_dir, args.layout, json.loads(args.field_map) if args.field_map else None, args.limit, looks)
    print0(f"bench {args.bench_dir} ({args.layout}): " + ", ".join(f"{s} {sum(it['split'] == s for it in items)}"
                                                                    for s in SPLIT_MODE) + f" items; {world} rank(s)")
    out, res = Path(args.out), {"bench_dir": str(args.bench_dir), "layout": args.layout, "critics": {}}
    for name, spec, scope, note in critics:
        if note:
            print0(f"[{name}] skipped: {note}")
            res["critics"][name] = {"spec": spec, "note": f"skipped: {note}"}
            continue
        its = [it for it in items if scope in ("all", "gen" if it["split"] == "gen" else "edit")]
        path = predict_all(name, spec, its, args, rank, world, device)
        if rank == 0:
            preds = read_parts([path], "key")
            ev = evaluate(its, preds)
            res["critics"][name] = {"spec": spec, "scope": scope, "predictions": str(path), **ev,
                                    "note": "" if scope == "all" else f"{scope} splits only"}
            if any(it["split"] == "gen" for it in its):
                release = release_gen_records(its, preds)
                write_jsonl(path.with_name("gen_release.jsonl"), release)
                print(f"[{name}] {path.with_name('gen_release.jsonl')}: {len(release)} of "
                      f"{sum(it['split'] == 'gen' for it in its)} gen items in the release's schema (the rest had no score)")
            confusion_png(out / f"confusion_{name}.png", name, ev["confusion"])
    if rank == 0:
        write_json(out / "critics.json", res)
        (out / "critics.md").write_text(md := critics_markdown(res))
        print(md + f"\nwrote {out}/critics.md, critics.json, confusion_*.png", flush=True)
    cleanup_dist()


# -----------------------------------------------------------------------------
# policy command: sample with fixed seeds, judge independently, base vs each tuned policy


def policy_judge(spec, kind, device, max_new_tokens=None, prompt_file=None):
    """-> judge(records, images, sources) -> policy_scores of the critic `spec` names. Each item carries its prompt
    record ("record"): a judge that knows the answer (a world's) reads it there. The same for a critic whose rewards
    are compared with the judge's (--critic)."""
    critic = reward.open_critic(spec, device=device, prompt_file=prompt_file, max_new_tokens=max_new_tokens)
    return lambda recs, ims, sources: policy_scores(critic, kind, recs, ims, sources)


def policy_scores(critic, kind, recs, ims, sources, method="generate", samples=1):
    """[(score in [0, 1] or None: an answer that did not parse, {part: [0, 1]})] per sample, with the paper's fusion:
    QMA for gen (the score alone), CME for edit (parts execution and consistency, (s-1)/4)."""
    if kind == "gen":
        items = [{"image": im, "prompt": r["prompt"], "requirement": r.get("requirement"), "record": r}
                 for r, im in zip(recs, ims)]
        return [(s, {}) for s in reward.gen_rewards(critic, items, fusion="qma", method=method, samples=samples)[0]]
    items = [{"source": src, "edited": im, "instruction": r["prompt"], "requirement": r.get("requirement"),
              "record": r} for r, im, src in zip(recs, ims, sources)]
    per_mode = {m: critic.score(m, items, method=method, samples=samples)  # edit_rewards' calls, parts kept
                for m in ("execution", "consistency")}
    parts = [{m: reward.normalize_score(js[i].scores[0]) for m, js in per_mode.items() if js[i].ok}
             for i in range(len(items))]
    return list(zip(reward.fuse_judgements(per_mode, "cme")[0], parts))


def score_files(out, variant):
    """Every rank's scores-<variant>-<rank>.jsonl (a name may contain '-', the rank is the last part)."""
    pattern = rf"scores-{re.escape(variant)}-\d+\.jsonl"
    return [f for f in sorted(out.glob("scores-*.jsonl")) if re.fullmatch(pattern, f.name)]


def run_policy(args):
    rank, world, device = setup_dist()
    fields = {"id": "id", "prompt": "text", "image": "image" if args.kind == "edit" else "image?", "requirement": "str?"}
    recs = read_manifest(args.prompts, fields, images="decode" if args.kind == "edit" else "exist")[:args.limit]
    K, base_dir, policies, out = args.samples_per_prompt, Path(args.prompts).parent, {"base": None, **args.tuned}, Path(args.out)
    fp = fingerprint(args.base, args.kind, args.judge, args.seed, K, args.steps, args.max_new_tokens,
                     args.prompt_file and fingerprint(args.prompt_file),
                     *(fingerprint(p, n) for n, p in {**args.tuned, **args.critics}.items()))
    start_fresh_if_changed(out, fp, rank, "the policies, judge, seeds or steps")
    done = {v: read_parts(score_files(out, v), "uid") for v in policies}
    dist.barrier()  # every rank has read (and repaired) the old files before any rank appends to them
    judge, rl = policy_judge(args.judge, args.kind, device, prompt_file=args.prompt_file), importlib.import_module(f"rl_{args.kind}")
    critics = {n: policy_judge(s, args.kind, device, args.max_new_tokens, args.prompt_file) for n, s in args.critics.items()}
    steps = args.steps or {"gen": 10, "edit": 6}[args.kind]  # as in RL
    jobs = [(i * K + k, r, k) for i, r in enumerate(recs) for k in range(K)]  # global index -> seed
    for variant, lora in policies.items():
        mine = [j for j in jobs if j[0] % world == rank and f"{j[1]['id']}#{j[2]}" not in done[variant]]
        if not mine:
            continue
        model = (rl.load_generator if args.kind == "gen" else rl.load_editor)(args.base, lora_dir=lora, device=device)
        (out / "images" / variant).mkdir(parents=True, exist_ok=True)
        for s in range(0, len(mine), args.batch_size):
            chunk = mine[s:s + args.batch_size]
            rs, seeds, srcs = [r for _, r, _ in chunk], [args.seed + g for g, _, _ in chunk], None
            if args.kind == "gen":
                ims = rl.generate(model, [r["prompt"] for r in rs], seeds, steps=steps)
            else:
                srcs = [load_image(r["image"], base_dir) for r in rs]
                ims = rl.edit(model, srcs, [r["prompt"] for r in rs], seeds, steps=steps)
            rewards = {n: [s for s, _ in c(rs, ims, srcs)] for n, c in critics.items()}  # what RL would learn from
            for i, ((g, r, k), im, (score, parts)) in enumerate(zip(chunk, ims, judge(rs, ims, srcs))):
                im.save(out / "images" / variant / f"{r['id']}_{k}.png")
                append_jsonl(out / f"scores-{variant}-{rank}.jsonl", {"uid": f"{r['id']}#{k}", "id": r["id"],
                             "sample": k, "seed": args.seed + g, "score": score, "parts": parts,
                             "critics": {n: v[i] for n, v in rewards.items()}})
        print(f"{variant}: rank {rank} did {len(mine)} samples", flush=True)
        del model
    dist.barrier()  # every rank's scores are on disk before rank 0 summarises them
    if rank == 0:
        policy_summary(args, recs, out, base_dir, {v: read_parts(score_files(out, v), "uid") for v in policies})
    cleanup_dist()


def within_prompt_ranking(scores, critic):
    """How a critic's rewards rank the samples of each prompt (pooled over the policies) against the judge's scores:
    {prompts, spearman (mean; 0 for a prompt where the critic gives every sample one reward), all_tied (such prompts),
    mean, per_policy (its mean reward per policy)}. Prompts where the judge ties every sample are left out."""
    by_prompt = {}
    for rows in scores.values():
        for r in rows.values():
            c = (r.get("critics") or {}).get(critic)
            if r["score"] is not None and c is not None:
                by_prompt.setdefault(r["id"], []).append((c, r["score"]))
    rhos, tied = [], 0
    for pairs in by_prompt.values():
        crit, judged = zip(*pairs)
        if len(pairs) < 2 or len(set(judged)) == 1:
            continue  # nothing to rank
        tied += len(set(crit)) == 1
        rhos.append(0.0 if len(set(crit)) == 1 else spearman(crit, judged))
    rewards = {v: [x for r in rows.values() if (x := (r.get("critics") or {}).get(critic)) is not None]
               for v, rows in scores.items()}
    return {"prompts": len(rhos), "spearman": float(np.mean(rhos)) if rhos else float("nan"), "all_tied": tied,
            "mean": mean_ci([x for xs in rewards.values() for x in xs])[0],
            "per_policy": {v: mean_ci(xs)[0] for v, xs in rewards.items()}}


def policy_summary(args, recs, out, base_dir, scores):
    res = {"kind": args.kind, "judge": args.judge, "base": args.base, "tuned": args.tuned, "prompts": args.prompts,
           "samples_per_prompt": args.samples_per_prompt, "seed": args.seed, "variants": {}}
    for v, rows in scores.items():
        good = [r["score"] for r in rows.values() if r["score"] is not None]
        m, ci = mean_ci(good)
        names = dict.fromkeys(k for r in rows.values() for k in r["parts"])  # gen: none; edit: execution, consistency
        parts = {k: [r["parts"][k] for r in rows.values() if k in r["parts"]] for k in names}
        res["variants"][v] = {"n": len(rows), "failures": len(rows) - len(good), "mean": m, "ci95": ci,
                              "parts": {k: float(np.mean(x)) for k, x in parts.items()}}
    for v in args.tuned:  # paired by prompt and seed: the CI of the gain is tighter than of either mean
        both = [scores[v][u]["score"] - r["score"] for u, r in scores["base"].items()
                if r["score"] is not None and scores[v].get(u, {}).get("score") is not None]
        m, ci = mean_ci(both)
        res[f"{v}_minus_base"] = {"n": len(both), "mean": m, "ci95": ci}
    res["critics"] = {n: within_prompt_ranking(scores, n) for n in args.critics}
    write_json(out / "policy.json", res)
    grid = []
    for r in recs[:args.grid_rows]:  # source (edit) | base | tuned ...: sample 0 of each prompt
        cells = [load_image(r["image"], base_dir)] if args.kind == "edit" else []
        cells += [load_image(p) for v in scores if (p := out / "images" / v / f"{r['id']}_0.png").is_file()]
        grid.append([c.resize((128, 128), Image.NEAREST) for c in cells])
    if grid:
        image_grid(grid).save(out / "grid.png")
    parts = list(dict.fromkeys(k for x in res["variants"].values() for k in x["parts"]))
    ci = lambda x: "—" if math.isnan(x["ci95"]) else f"+-{x['ci95']:.3f}"
    row = lambda name, x, cells: " | ".join(["", name, str(x["n"]), fmt(x["mean"], 3), ci(x), *map(str, cells), ""])
    fusion = ("CME = execution x (0.6 + 0.4 consistency), the parts as (s - 1) / 4" if args.kind == "edit" else
              "QMA = instruction x (0.4 + 0.6 min quality)")
    md = [f"# Policy evaluation ({args.kind}, judge {args.judge})", "",
          f"{len(recs)} prompts x {args.samples_per_prompt} seeds (seed = {args.seed} + global index, the same for "
          f"every policy). The judge's score is {fusion}. Mean +- 1.96 std/sqrt(n); the gains are paired per "
          "prompt and seed.", "",
          "| policy | n | mean score | 95% CI | " + "".join(f"{p} | " for p in parts) + "judge failures |",
          "|---" * (5 + len(parts)) + "|"]
    md += [row(v, x, [fmt(x["parts"].get(p), 3) for p in parts] + [x["failures"]]).strip()
           for v, x in res["variants"].items()]
    md += [row(f"{v} - base", res[f"{v}_minus_base"], [""] * (len(parts) + 1)).strip() for v in args.tuned]
    if res["critics"]:
        md += ["", "What RL learns from: how each critic's fused reward ranks the samples of one prompt (all policies' "
               f"samples of it, {len(scores) * args.samples_per_prompt} per prompt) against the judge. Spearman per prompt, "
               "0 where the critic gives them all one reward (no signal); prompts where the judge ties them all are left out.", "",
               "| critic | prompts | mean within-prompt Spearman | one reward for all | mean reward | " +
               " | ".join(f"{v}" for v in scores) + " |", "|---" * (5 + len(scores)) + "|"]
        md += [f"| {n} | {x['prompts']} | {fmt(x['spearman'], 2)} | {x['all_tied']} | {fmt(x['mean'], 3)} | " +
               " | ".join(fmt(x["per_policy"].get(v), 3) for v in scores) + " |" for n, x in res["critics"].items()]
    md += ["", f"![grid ({'source | ' if args.kind == 'edit' else ''}{' | '.join(scores)})](grid.png)", ""]
    (out / "policy.md").write_text("\n".join(md))
    print("\n".join(md), flush=True)


# -----------------------------------------------------------------------------
# CLI


PROMPT_FILE_HELP = ("scoring templates, JSON {mode: template} (reward.load_prompts), for every model critic this run "
                    "opens: critics trained on other templates than reward.PROMPTS, e.g. the released FIRM-Edit-8B / "
                    "FIRM-Gen-8B with the release's (bench those and ours in separate runs)")


def get_args(argv=None):
    ap = argparse.ArgumentParser(description="FIRM-Bench for critics, policy evaluation")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c, p = (sub.add_parser(n, formatter_class=argparse.ArgumentDefaultsHelpFormatter) for n in ("critics", "policy"))
    for q in (c, p):
        q.add_argument("--preset", default=None, choices=sorted(PRESETS), help="the miniature world's paths")
        q.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    # critics: bench
    c.add_argument("--bench-dir", default=None, help="bench directory (see --layout)")
    c.add_argument("--layout", default="mini", choices=sorted(LAYOUTS), help="file names and fields of the bench")
    c.add_argument("--field-map", default=None, help='JSON {"[split.]field": "dotted.path"} overriding the layout')
    c.add_argument("--limit", type=int, default=None, help="items per split (quick runs)")
    # critics: critics and decoding
    c.add_argument("--critic", action="append", default=None, help="NAME=SPEC[@edit|@gen]; SPEC = model dir | "
                   "http://host:port/v1[#served name] | package.module:factory | file:preds.jsonl | constant[:k]")
    c.add_argument("--sft-dir", default=None, help="SFT files whose mean score the 'constant' baseline predicts")
    c.add_argument("--method", default="generate", choices=reward.METHODS, help="critic scoring method")
    c.add_argument("--samples", type=int, default=1, help="self-ensemble size (generate only)")
    c.add_argument("--max-new-tokens", type=int, default=None, help="tokens per critic answer (default: reward.MAX_NEW_TOKENS, "
                   "the release's 256 edit / 8192 gen)")
    c.add_argument("--batch-size", type=int, default=16, help="items per critic batch")
    c.add_argument("--prompt-file", default=None, help=PROMPT_FILE_HELP)
    c.add_argument("--out", default=None, help="output directory (critics.md, critics.json, confusion_*.png, preds/)")
    # policy: models, prompts, judge
    p.add_argument("--kind", required=True, choices=["gen", "edit"])
    p.add_argument("--base", default=None, help="policy model directory (gen: SD3-style, edit: Qwen-Image-Edit-style)")
    p.add_argument("--tuned", action="append", default=None,
                   help="[NAME=]DIR of a tuned policy's LoRA (repeatable; NAME defaults to 'tuned')")
    p.add_argument("--prompts", default=None, help="held-out JSONL {id, prompt[, image, requirement]}")
    p.add_argument("--judge", default=None, help="the independent judge: model dir | http://host:port/v1[#name] | "
                   "package.module:factory")
    p.add_argument("--critic", action="append", default=None, dest="critics",
                   help="NAME=SPEC of a critic whose fused rewards of the same samples are ranked against the judge's "
                        "within each prompt (what RL's group advantages learn from; repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="--critic answer limit, tokens (default: reward.py's)")
    p.add_argument("--prompt-file", default=None, help=PROMPT_FILE_HELP)
    # policy: sampling and output
    p.add_argument("--samples-per-prompt", type=int, default=4, help="seeds per prompt")
    p.add_argument("--seed", type=int, default=1000, help="seed of global sample 0")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 10 gen, 6 edit: as in RL)")
    p.add_argument("--batch-size", type=int, default=16, help="samples per generation batch")
    p.add_argument("--limit", type=int, default=None, help="prompts to use (default all)")
    p.add_argument("--grid-rows", type=int, default=8, help="prompts shown in grid.png")
    p.add_argument("--out", default=None, help="output directory (policy.md, policy.json, grid.png, images/)")
    args = ap.parse_args(argv)
    args.preset_critics = args.cmd == "critics" and args.critic is None and args.preset is not None
    for k, v in PRESETS.get(args.preset, {}).get(" ".join([args.cmd, getattr(args, "kind", "")]).strip(), {}).items():
        if getattr(args, k) is None:  # the preset fills what the user did not give
            setattr(args, k, v)
    if args.cmd == "critics" and not (args.bench_dir and args.out and args.critic):
        ap.error("critics needs --bench-dir, --out and --critic (or --preset mini)")
    if args.cmd == "policy":
        if not (args.base and args.tuned and args.prompts and args.judge and args.out):
            ap.error("policy needs --base, --tuned, --prompts, --judge and --out (or --preset mini)")
        args.tuned = dict(t.split("=", 1) if "=" in t else ("tuned", t) for t in args.tuned)
        for c in args.critics or []:
            if not re.fullmatch(r"[A-Za-z0-9._-]+=.+", c):
                ap.error(f"--critic {c!r}: expected NAME=SPEC (NAME of letters, digits, . _ -)")
        args.critics = dict(c.split("=", 1) for c in args.critics or [])
        for name, path in args.tuned.items():  # what rl_gen.py / rl_edit.py write at the end of a run
            if not re.fullmatch(r"[A-Za-z0-9._-]+", name) or name == "base":
                ap.error(f"--tuned {name}={path}: NAME of letters, digits, . _ - (and not 'base')")
            if not ((Path(path) / "pytorch_lora_weights.safetensors").is_file() or Path(path, "transformer").is_dir()):
                ap.error(f"--tuned {name}={path}: no pytorch_lora_weights.safetensors or transformer/ there "
                         f"(train it first: python rl_{args.kind}.py ...)")
    return args


def main(argv=None):
    args = get_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        {"critics": run_critics, "policy": run_policy}[args.cmd](args)
    except DataError as e:
        die(str(e))


if __name__ == "__main__":
    main()
