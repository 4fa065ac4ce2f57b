"""The exact pixel judge of the miniature world: a rendering compared with the exactly known scene.

As critics (the seam every stage names judges by, reward.open_critic):
    toy.judges:pixel      gen: instruction = 1 + 4 x (objects x background), quality = [5, 5, 5] (so QMA and the
                          instruction fusion both give objects x background); edit: execution = 1 + 4 x edited,
                          consistency = 1 + 4 x kept
    toy.judges:pixel_sum  gen only: instruction = 1 + 4 x (0.5 objects + 0.5 background), the hackable sum (an empty
                          canvas scores 3)
Each item must carry its record (item["record"]) with the world's ground truth in record["toy"].
"""

import copy
import json

import numpy as np

from common import DataError
from reward import EDIT_MODES, GEN_MODES, Judgement
from toy.world import BACKGROUNDS, COLORS, Scene, apply_edit, render

# -----------------------------------------------------------------------------
# the independent pixel judge (for policies; never used as a training reward by the critic path)


def object_mask(scene, oid, size):
    one = Scene("white", [copy.deepcopy(scene.get(oid))])
    one.objects[0].tint = 0
    return np.asarray(render(one, size)).min(axis=2) < 235  # non-white pixels of the lone object


def pixel_match(img, scene):
    """Fraction of pixels whose colour is within a tolerance of the exact rendering of `scene` (0..1)."""
    a = np.asarray(img.convert("RGB"), dtype=np.float32)
    b = np.asarray(render(scene, img.width), dtype=np.float32)
    return float((np.abs(a - b).max(axis=2) < 48).mean())


def pixel_judge_gen(img, scene):
    """Independent judge for a generated image: per-object colour coverage and background, in 0..1."""
    size = img.width
    a = np.asarray(img.convert("RGB"), dtype=np.float32)
    parts = []
    for o in scene.objects:
        m = object_mask(scene, o.id, size)
        parts.append(float((np.abs(a[m] - np.array(COLORS[o.color])).max(axis=1) < 60).mean()))
    full = np.zeros(a.shape[:2], bool)
    for o in scene.objects:
        full |= object_mask(scene, o.id, size)
    bg = float((np.abs(a[~full] - np.array(BACKGROUNDS[scene.background])).max(axis=1) < 48).mean())
    objects = float(np.mean(parts)) if parts else 1.0
    # a product, not a sum: an empty canvas (objects 0) or one painted over (background 0) scores 0
    return {"objects": objects, "background": bg, "overall": objects * bg}


def pixel_judge_edit(img, src, target):
    """Independent judge for an edit: the edited region against the target, the rest against the source."""
    size = img.width
    a = np.asarray(img.convert("RGB"), dtype=np.float32)
    s = np.asarray(render(src, size), dtype=np.float32)
    t = np.asarray(render(target, size), dtype=np.float32)
    region = np.abs(s - t).max(axis=2) > 0
    close = lambda x, y: np.abs(x - y).max(axis=-1) < 48
    edited = float(close(a[region], t[region]).mean()) if region.any() else 1.0
    kept = float(close(a[~region], s[~region]).mean()) if (~region).any() else 1.0
    # a product, not a sum: returning the input unchanged (edited ~0) must not score 0.5
    return {"edited": edited, "kept": kept, "overall": edited * kept}



# -----------------------------------------------------------------------------
# the pixel judge as a critic


def ground_truth(record, fields, what="item"):
    """record["toy"], the world's ground truth, with `fields`; DataError naming the record otherwise."""
    if not isinstance(record, dict):
        raise DataError(f"{what} has no 'record': the miniature world's judges read the ground truth from "
                        f"item['record']['toy']")
    name, truth = record.get("id"), record.get("toy")
    missing = [f for f in fields if not isinstance(truth, dict) or f not in truth]
    if missing:
        raise DataError(f"{what} {name!r}: field 'toy' lacks {', '.join(missing)}: the miniature world's judges need "
                        f"its ground truth (only the world's records carry it)")
    return truth


class PixelCritic:
    """Scores 1 + 4 x a fraction of the pixel judge, unrounded: a fusion's (s - 1) / 4 gives the fraction back."""

    def __init__(self, gen_fraction, gen_only=False):
        self.gen_fraction, self.gen_only = gen_fraction, gen_only  # pixel_judge_gen's parts -> 0..1

    def score(self, mode, items, method="generate", samples=1):
        """The judge is exact and deterministic: `method` and `samples` change nothing."""
        return [self.judge(mode, item) for item in items]

    def judge(self, mode, item):
        if mode == "quality":  # the pixel judge rates no rendering quality: the best score, so QMA = instruction
            return Judgement([5, 5, 5], json.dumps({"reasoning": "quality is not judged", "score": [5, 5, 5]}), True,
                             how="pixel")
        if mode in GEN_MODES:
            truth = ground_truth(item.get("record"), ("scene",))
            parts = pixel_judge_gen(item["image"], Scene.from_dict(truth["scene"]))
            score = 1 + 4 * self.gen_fraction(parts)
            reasoning = f"objects {parts['objects']:.2f}, background {parts['background']:.2f}"
        elif mode in EDIT_MODES:
            if self.gen_only:
                raise ValueError(f"toy.judges:pixel_sum judges generations only, not {mode}")
            truth = ground_truth(item.get("record"), ("scene", "edit"))
            src = Scene.from_dict(truth["scene"])
            parts = pixel_judge_edit(item["edited"], src, apply_edit(src, truth["edit"]))
            score = 1 + 4 * parts["edited" if mode == "execution" else "kept"]
            reasoning = f"edited {parts['edited']:.2f}, kept {parts['kept']:.2f}"
        else:
            raise ValueError(f"unknown mode {mode!r}")
        return Judgement([score], json.dumps({"reasoning": reasoning, "score": [round(score, 2)]}), True, how="pixel")


def pixel():
    """The exact reward of the world: objects x background (gen), edited and kept (edit)."""
    return PixelCritic(lambda parts: parts["overall"])


def pixel_sum():
    """The 0.5 / 0.5 sum of objects and background: an empty canvas earns half (the reward hack, kept to show it)."""
    return PixelCritic(lambda parts: 0.5 * parts["objects"] + 0.5 * parts["background"], gen_only=True)
