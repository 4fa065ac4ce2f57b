"""The miniature run's report: runs/mini/REPORT.md gathers what the stages of run_mini.sh wrote.

    python -m toy report                 # runs/mini/REPORT.md (the last step of run_mini.sh)
    python -m toy report --root DIR      # another run's directory of the same layout

Sections: 1. the critics on the miniature FIRM-Bench (bench.py critics --preset mini), 2. the RL runs (training
reward from metrics.jsonl, held-out evaluation from eval.jsonl), 3. the policies on held-out prompts judged by the
world's exact pixel judge (bench.py policy --preset mini), each grid with the exact target as a column, 4. each
step's time (logs/times.tsv, written by run_mini.sh). A section
whose inputs are missing says which command makes them.

What is the world's here, not the paper's: the bench's "human" scores are the exact ground truth of the rubrics
(toy/rubrics.py), and the independent judge is the pixel judge (toy/judges.py), which knows the target scene.
"""

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from common import image_grid, load_image, plot_curves, read_jsonl, read_jsonl_resumable
from toy.world import Scene, render

HELD_OUT = ("eval_reward", "eval_judge")  # eval.jsonl: the RL reward and the independent judge on held-out prompts


def fmt(v, digits=3):
    return "—" if v is None or not np.isfinite(v) else f"{v:.{digits}f}"


def critics_section(root):
    crit = root / "bench" / "critics.md"
    if not crit.is_file():
        return ["_missing: run `python bench.py critics --preset mini`_", ""]
    pngs = sorted((root / "bench").glob("confusion_*.png"))
    links = ", ".join(f"[{p.stem[len('confusion_'):]}](bench/{p.name})" for p in pngs)
    return [crit.read_text(), "Confusion matrices: " + links, ""]


def rl_section(root):
    """One row per RL run: its training reward (metrics.jsonl) and its held-out numbers (eval.jsonl), with a curve."""
    runs = [d for d in sorted(root.glob("rl_gen*")) + sorted(root.glob("rl_edit*")) if (d / "metrics.jsonl").is_file()]
    if not runs:
        return [f"_missing: no {root}/rl_gen*/metrics.jsonl or rl_edit*/metrics.jsonl (run rl_gen.py / rl_edit.py)_", ""]
    md = ["| run | log rows | reward first | reward last (mean of last 10%) | held-out eval first -> last | curve |",
          "|---|---|---|---|---|---|"]
    for d in runs:
        train, evals = read_jsonl_resumable(d / "metrics.jsonl"), read_jsonl_resumable(d / "eval.jsonl")
        series = lambda rows, k: [(r.get("step", i), r[k]) for i, r in enumerate(rows)
                                  if isinstance(r.get(k), (int, float))]
        curves = {"reward": series(train, "reward"), **{k: series(evals, k) for k in HELD_OUT if series(evals, k)}}
        png = root / "report" / f"{d.name}_reward.png"
        plot_curves(png, curves, title=f"{d.name}: reward and held-out judge")
        vals = [y for _, y in curves["reward"]]
        last = float(np.mean(vals[-max(1, len(vals) // 10):])) if vals else None
        held = "; ".join(f"{k} {fmt(curves[k][0][1])} -> {fmt(curves[k][-1][1])}" for k in HELD_OUT if k in curves)
        md.append(f"| {d.name} | {len(train)} | {fmt(vals[0] if vals else None)} | {fmt(last)} | {held or '—'} | "
                  f"![{d.name}](report/{png.name}) |")
    return md + [""]


def target_grid(root, policy_dir, rows=8):
    """The policy's grid with the world's exact answer beside the samples: source (edit) | target | base | tuned ...
    -> (its Markdown image line, None), or (None, a note saying why there is none)."""
    res = json.loads((policy_dir / "policy.json").read_text())
    prompts = Path(res["prompts"])
    recs = read_jsonl(prompts)[:rows] if prompts.is_file() else []
    if not recs or any("toy" not in r for r in recs):
        return None, f"(no target column: {prompts} is not here or its records carry no 'toy' ground truth)"
    grid = []
    for r in recs:
        cells = [load_image(r["image"], prompts.parent)] if res["kind"] == "edit" else []
        cells.append(render(Scene.from_dict(r["toy"].get("target_scene", r["toy"]["scene"])), 64))
        samples = [policy_dir / "images" / v / f"{r['id']}_0.png" for v in res["variants"]]
        cells += [load_image(p) for p in samples if p.is_file()]
        grid.append([c.resize((128, 128), Image.NEAREST) for c in cells])
    path = root / "report" / f"{policy_dir.name}_grid.png"
    image_grid(grid).save(path)
    cols = ("source | " if res["kind"] == "edit" else "") + "target | " + " | ".join(res["variants"])
    return f"![grid ({cols})]({path.relative_to(root)})", None


def policy_section(root):
    md = []
    for p in sorted((root / "bench").glob("policy*/policy.md")):
        grid, note = target_grid(root, p.parent)
        for line in p.read_text().replace("# Policy", "### Policy").splitlines():
            if line.endswith("](grid.png)"):  # bench's grid (no target) only where the world's cannot be drawn
                line = grid or line.replace("](grid.png)", f"]({p.parent.relative_to(root)}/grid.png) {note}")
            md.append(line)
        md.append("")
    return md or ["_missing: run `python bench.py policy --preset mini --kind gen|edit`_", ""]


def times_section(root):
    """run_mini.sh's steps with their start and end (seconds since the job started), from logs/times.tsv."""
    path = root / "logs" / "times.tsv"
    if not path.is_file():
        return ["_missing: logs/times.tsv (written by run_mini.sh)_", ""]
    md = ["| step | start s | end s | took s |", "|---|---|---|---|"]
    for i, line in enumerate(path.read_text().splitlines(), 1):
        try:
            name, start, end = line.split("\t")
            md.append(f"| {name} | {int(start)} | {int(end)} | {int(end) - int(start)} |")
        except ValueError:
            raise ValueError(f"{path}:{i}: expected 'name<TAB>start<TAB>end' in seconds, got {line!r}") from None
    return md + ["", "Two lanes run side by side, one per core (run_mini.sh); `all` is the whole job. A rerun times "
                 "only the steps it runs.", ""]


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m toy report", description="the miniature run's report, REPORT.md")
    ap.add_argument("--root", default="runs/mini", help="the run's directory (what run_mini.sh writes)")
    root = Path(ap.parse_args(argv).root)
    (root / "report").mkdir(parents=True, exist_ok=True)
    md = ["# FIRM miniature pipeline report", "", "Generated by `python -m toy report`; sections whose inputs are "
          "missing say which command makes them. The bench's \"human\" scores are the world's exact ground truth.", "",
          "## 1. Critics on the miniature FIRM-Bench", "", *critics_section(root),
          "## 2. RL runs (training reward from metrics.jsonl; held-out evaluation from eval.jsonl)", "", *rl_section(root),
          "## 3. Policies on held-out prompts (an independent judge)", "", *policy_section(root),
          "## 4. Where the time went (run_mini.sh)", "", *times_section(root)]
    (root / "REPORT.md").write_text("\n".join(md) + "\n")
    print(f"wrote {root / 'REPORT.md'}")


if __name__ == "__main__":
    main()
