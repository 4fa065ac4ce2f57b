"""The miniature world: procedurally drawn scenes with exactly known ground truth (a package, one file per part).

    world.py     scenes, rendering, edits and instructions, scene differences, prompts and checklists
    rubrics.py   ground-truth scores that follow the FIRM rubrics; simulated editors and generators
    oracle.py    the teacher that writes the curation texts; its critic factories (noisy, direct, teacher)
    judges.py    the exact pixel judge; its critic factories (pixel, pixel_sum)
    perception.py  the teacher's perception: a scene read back from the pixels (for the policies' own samples)
    models.py    tiny randomly initialised models of the real classes (critic base, generator, editor)
    pretrain.py  pre-training the tiny policies by flow matching
    data.py      the world's data: candidates to curate (simulated, and the tiny policies' own samples), bench splits,
                 RL prompts; the tiny critic base
    report.py    the miniature run's report
    __main__.py  the CLI: python -m toy --help

Stage scripts never import this package: they reach the world's judges through reward.open_critic specs
("toy.judges:pixel", "toy.oracle:teacher", ...). The names below are re-exported for tests and older callers.
"""

from toy.judges import pixel_judge_edit, pixel_judge_gen
from toy.models import QWEN_CHAT_TEMPLATE, build_tiny_critic, build_tiny_editor, dense_labels, pretrain_vision, world_prompts
from toy.oracle import OracleJudge
from toy.rubrics import (EDITORS, GENERATORS, consistency_from_counts, consistency_score, execution_score,
                         instruction_score, quality_scores, simulate_editor, simulate_generator)
from toy.world import (BACKGROUNDS, COLORS, EDIT_OPS, NUDGE, SHAPES, Obj, Scene, apply_edit, cell_name, change_phrase,
                       describe, edit_triple, gen_prompt, instruction, random_edit, random_scene, render, request_summary,
                       scene_changes)

__all__ = ["BACKGROUNDS", "COLORS", "EDITORS", "EDIT_OPS", "GENERATORS", "NUDGE", "QWEN_CHAT_TEMPLATE", "SHAPES", "Obj",
           "OracleJudge", "Scene", "apply_edit", "build_tiny_critic", "build_tiny_editor", "cell_name", "change_phrase",
           "consistency_from_counts", "consistency_score", "dense_labels", "describe", "edit_triple", "execution_score",
           "gen_prompt", "instruction", "instruction_score", "main", "pixel_judge_edit", "pixel_judge_gen",
           "pretrain_vision", "quality_scores", "random_edit", "random_scene", "render", "request_summary",
           "scene_changes", "simulate_editor", "simulate_generator", "world_prompts"]


def main(argv=None):
    """`python -m toy ...` in process (toy/__main__.py)."""
    from toy.__main__ import main as cli
    return cli(argv)
