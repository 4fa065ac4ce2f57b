"""The CLI of the miniature world.

    python -m toy show              # a picture of the world: runs/mini/toy_examples.png
    python -m toy world             # the world's data: candidates to curate, bench splits, RL prompts (toy/data.py)
    python -m toy policy-candidates # after pretrain-gen / -edit, before curate.py: the policies' own samples (toy/data.py)
    python -m toy critic-base       # after curate.py: the seeing-stage records and the tiny critic base (toy/data.py)
    python -m toy pretrain-gen      # the tiny SD3 generator, pre-trained (toy/pretrain.py)
    python -m toy pretrain-edit     # the tiny Qwen-Image editor, pre-trained (toy/pretrain.py)
    python -m toy report ...        # the miniature run's report (toy/report.py)
    python -m toy <command> --help  # every flag
"""

import argparse
import random
import sys
from pathlib import Path

from PIL import Image

from common import image_grid
from toy import data, pretrain
from toy.rubrics import EDITORS, consistency_score, execution_score, simulate_editor
from toy.world import instruction, random_edit, random_scene, render

def show_args(ap):
    ap.add_argument("--out", default="runs/mini/toy_examples.png")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--seed", type=int, default=0)


def show(args):
    """A picture of the world: sources, then every simulated editor's output, with execution scores."""
    rng = random.Random(args.seed)
    rows = []
    for i in range(6):
        src = random_scene(rng)
        edit = random_edit(rng, src)
        row, scores = [render(src, args.size)], []
        for kind in EDITORS:
            out, deg = simulate_editor(random.Random(f"{i}:{kind}"), src, edit, kind)
            row.append(render(out, args.size, deg, seed=i))
            scores.append(f"{kind}: E{execution_score(src, out, edit)}/C{consistency_score(src, out, edit)}")
        print(f"{instruction(src, edit)}  ->  " + ", ".join(scores))
        rows.append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    image_grid(rows).resize((len(rows[0]) * 130, len(rows) * 130), Image.NEAREST).save(args.out)
    print(f"wrote {args.out} (columns: source, then editors {', '.join(EDITORS)})")


# name -> (add_arguments(parser), run(args))
COMMANDS = {"show": (show_args, show),
            "world": (data.world_args, data.build_world),
            "policy-candidates": (data.policy_candidates_args, data.build_policy_candidates),
            "critic-base": (data.critic_base_args, data.build_critic_base),
            "pretrain-gen": (pretrain.pretrain_gen_args, pretrain.pretrain_gen),
            "pretrain-edit": (pretrain.pretrain_edit_args, pretrain.pretrain_edit)}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["report"]:  # the report has its own flags (toy/report.py)
        from toy import report
        return report.main(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m toy", description="The FIRM miniature world")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, (add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    sub.add_parser("report", help="the miniature run's report: python -m toy report --help")
    args = ap.parse_args(argv)
    COMMANDS[args.cmd][1](args)


if __name__ == "__main__":
    main()
