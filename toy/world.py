"""The miniature world: procedurally drawn scenes with exactly known ground truth.

Every stage of the paper runs on this world on a laptop CPU, through the same code paths the real
models use. It provides
  - scenes (1-2 coloured shapes on a background) rendered with PIL, and their descriptions;
  - edits (recolour, remove, add, move, resize, replace, background) with exact target scenes, and
    simulated editors of varied quality (perfect, partial, wrong object, no-op, extra changes,
    degraded, different image);
  - prompts written from scenes, simulated generators (correct, missing object, wrong attribute,
    wrong details, degraded, irrelevant);
  - ground-truth scores that follow the FIRM rubrics (FIRM_NOTES section 2), computed from the
    scene difference: execution / consistency for edits, instruction following and three quality
    ratings for generations;
  - an oracle judge that writes the texts of the paper's curation pipelines (difference reports,
    reasoning + JSON scores, checklist plans, item-by-item analyses ending in \\boxed{n}), with a
    noise model in which a judge scoring directly misses details more often than one that first
    writes a difference report or plan (the paper's argument for its pipelines);
  - an independent pixel judge for policies (compares against the exactly known target scene);
  - builders for tiny randomly initialised models of the real architecture classes, saved as
    ordinary model directories.

CLI:  python toy.py show          (a picture of the world: runs/mini/toy_examples.png)
      python toy.py --help          (every command, e.g. pre-training the tiny policies)
"""

import argparse
import copy
import json
import math
import random
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# -----------------------------------------------------------------------------
# the world's vocabulary

COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (235, 200, 30), "purple": (140, 60, 180), "orange": (240, 130, 30),
}
BACKGROUNDS = {"white": (245, 245, 245), "gray": (150, 150, 150), "beige": (225, 205, 160), "light blue": (170, 205, 240)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.17, "medium": 0.22, "large": 0.27}  # radius as a fraction of the image side
ROWS, COLS = ("top", "middle", "bottom"), ("left", "center", "right")
CELL_CENTRES = (0.22, 0.5, 0.78)
NUDGE = 0.07  # a "minor" displacement, as a fraction of the image side
TINT = 0.55  # a tinted object is drawn this much darker: a "minor" colour change


def cell_name(col, row):
    return "center" if (col, row) == (1, 1) else f"{ROWS[row]} {COLS[col]}"


@dataclass
class Obj:
    id: int
    shape: str
    color: str
    size: str
    col: int
    row: int
    dx: float = 0.0  # minor displacement inside the cell
    dy: float = 0.0
    tint: int = 0  # 1 = drawn slightly darker

    @property
    def name(self):
        return f"{self.color} {self.shape}"


@dataclass
class Scene:
    background: str
    objects: list = field(default_factory=list)

    def to_dict(self):
        return asdict(self)

    @staticmethod
    def from_dict(d):
        return Scene(d["background"], [Obj(**o) for o in d["objects"]])

    def get(self, oid):
        return next((o for o in self.objects if o.id == oid), None)

    def free_cells(self, exclude_id=None):
        """Cells at Chebyshev distance >= 2 from every other object, so objects never overlap."""
        others = [o for o in self.objects if o.id != exclude_id]
        return [(c, r) for r in range(3) for c in range(3)
                if all(max(abs(c - o.col), abs(r - o.row)) >= 2 for o in others)]


def random_object(rng, oid, scene=None, cell=None):
    taken = {(o.color, o.shape) for o in scene.objects} if scene else set()
    while True:
        shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        if (color, shape) not in taken and all(o.color != color for o in (scene.objects if scene else [])):
            break
    col, row = cell if cell else rng.choice(scene.free_cells() if scene else [(c, r) for r in range(3) for c in range(3)])
    return Obj(oid, shape, color, rng.choice(["small", "large"]), col, row)


def random_scene(rng, n_objects=None):
    scene = Scene(rng.choice(list(BACKGROUNDS)))
    for i in range(n_objects or rng.choice([1, 2])):
        if not scene.free_cells():
            break
        scene.objects.append(random_object(rng, i, scene))
    return scene


def describe(scene):
    """Every attribute that scene_changes compares, in words (a small shift as "near" its cell): a source of the
    world (objects at their cell centres) and its edit with equal descriptions have no change."""
    parts = [f"a {o.size} {'dark ' if o.tint else ''}{o.color} {o.shape} {'near' if (o.dx, o.dy) != (0, 0) else 'at'} "
             f"the {cell_name(o.col, o.row)}" for o in scene.objects]
    return (" and ".join(parts) or "nothing") + f" on a {scene.background} background"


# -----------------------------------------------------------------------------
# rendering


def render(scene, size=64, degrade=None, seed=0):
    """Draw a scene. `degrade` = {"noise": 0-4, "blur": 0-4, "washed": 0-4} severities."""
    im = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    d = ImageDraw.Draw(im)
    for o in scene.objects:
        cx = (CELL_CENTRES[o.col] + o.dx) * size
        cy = (CELL_CENTRES[o.row] + o.dy) * size
        r = SIZES[o.size] * size
        rgb = tuple(int(v * (TINT if o.tint else 1)) for v in COLORS[o.color])
        if o.shape == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
        elif o.shape == "square":
            d.rectangle([cx - r * 0.9, cy - r * 0.9, cx + r * 0.9, cy + r * 0.9], fill=rgb)
        else:
            d.polygon([(cx, cy - r), (cx - r, cy + r * 0.85), (cx + r, cy + r * 0.85)], fill=rgb)
    return apply_degradation(im, degrade or {}, seed)


NOISE_SIGMA = (0, 12, 25, 45, 70)
BLUR_RADIUS = (0, 0.7, 1.3, 2.2, 3.5)
WASH_CONTRAST = (1.0, 0.75, 0.5, 0.3, 0.15)


def apply_degradation(im, degrade, seed=0):
    if degrade.get("blur"):
        im = im.filter(ImageFilter.GaussianBlur(BLUR_RADIUS[degrade["blur"]] * im.width / 64))
    x = np.asarray(im, dtype=np.float32)
    if degrade.get("washed"):
        x = 128 + (x - 128) * WASH_CONTRAST[degrade["washed"]]
    if degrade.get("noise"):
        x = x + np.random.default_rng(seed).normal(0, NOISE_SIGMA[degrade["noise"]], x.shape)
    return Image.fromarray(np.clip(x, 0, 255).round().astype(np.uint8))


# -----------------------------------------------------------------------------
# edits: instruction + exact target scene


EDIT_OPS = ("recolor", "remove", "add", "move", "resize", "replace", "background")


def random_edit(rng, scene, op=None):
    """Sample an edit that is applicable to `scene`."""
    ops = [o for o in EDIT_OPS if applicable(o, scene)]
    op = op if op in ops else rng.choice(ops)
    if op == "background":
        return {"op": op, "color": rng.choice([b for b in BACKGROUNDS if b != scene.background])}
    if op == "add":
        obj = random_object(rng, max((o.id for o in scene.objects), default=-1) + 1, scene)
        return {"op": op, "object": asdict(obj)}
    t = rng.choice(scene.objects)
    if op == "recolor":
        return {"op": op, "target": t.id, "color": rng.choice([c for c in COLORS if all(o.color != c for o in scene.objects)])}
    if op == "remove":
        return {"op": op, "target": t.id}
    if op == "move":
        col, row = rng.choice([c for c in scene.free_cells(t.id) if c != (t.col, t.row)])
        return {"op": op, "target": t.id, "col": col, "row": row}
    if op == "resize":
        return {"op": op, "target": t.id, "size": "small" if t.size == "large" else "large"}
    shapes = [s for s in SHAPES if s != t.shape]
    colors = [c for c in COLORS if all(o.color != c for o in scene.objects)]
    return {"op": op, "target": t.id, "shape": rng.choice(shapes), "color": rng.choice(colors)}


def applicable(op, scene):
    if op in ("recolor", "resize", "replace"):
        return len(scene.objects) >= 1
    if op == "remove":
        return len(scene.objects) >= 2  # never leave an empty scene
    if op == "add":
        return len(scene.objects) < 2 and bool(scene.free_cells())
    if op == "move":
        return any(scene.free_cells(o.id) != [(o.col, o.row)] for o in scene.objects)
    return True


def apply_edit(scene, edit):
    out = copy.deepcopy(scene)
    op = edit["op"]
    if op == "background":
        out.background = edit["color"]
        return out
    if op == "add":
        out.objects.append(Obj(**edit["object"]))
        return out
    t = out.get(edit["target"])
    if op == "recolor":
        t.color, t.tint = edit["color"], 0
    elif op == "remove":
        out.objects.remove(t)
    elif op == "move":
        t.col, t.row, t.dx, t.dy = edit["col"], edit["row"], 0.0, 0.0
    elif op == "resize":
        t.size = edit["size"]
    elif op == "replace":
        t.shape, t.color, t.tint = edit["shape"], edit["color"], 0
    return out


def instruction(scene, edit, rng=None):
    """Natural-language instruction for an edit (a few phrasings, chosen by `rng`)."""
    pick = (lambda xs: rng.choice(xs)) if rng else (lambda xs: xs[0])
    op = edit["op"]
    if op == "background":
        return pick(["Change the background to {c}.", "Make the background {c}."]).format(c=edit["color"])
    if op == "add":
        o = Obj(**edit["object"])
        return pick(["Add a {s} {n} at the {p}.", "Put a {s} {n} at the {p}."]).format(s=o.size, n=o.name, p=cell_name(o.col, o.row))
    t = scene.get(edit["target"])
    if op == "recolor":
        return pick(["Change the color of the {n} to {c}.", "Make the {n} {c}."]).format(n=t.name, c=edit["color"])
    if op == "remove":
        return pick(["Remove the {n}.", "Delete the {n} from the picture."]).format(n=t.name)
    if op == "move":
        return pick(["Move the {n} to the {p}.", "Place the {n} at the {p}."]).format(n=t.name, p=cell_name(edit["col"], edit["row"]))
    if op == "resize":
        word = "bigger" if edit["size"] == "large" else "smaller"
        return pick(["Make the {n} {w}.", "Make the {n} much {w}."]).format(n=t.name, w=word)
    return pick(["Replace the {n} with a {c} {s}.", "Turn the {n} into a {c} {s}."]).format(n=t.name, c=edit["color"], s=edit["shape"])


def request_summary(scene, edit):
    """The short form of what was asked, as the oracle's reasoning names it."""
    op = edit["op"]
    if op == "background":
        return f"background to {edit['color']}"
    if op == "add":
        o = Obj(**edit["object"])
        return f"add {o.size} {o.name} at {cell_name(o.col, o.row)}"
    t = scene.get(edit["target"])
    return {
        "recolor": lambda: f"{t.name} to {edit.get('color')}",
        "remove": lambda: f"remove {t.name}",
        "move": lambda: f"move {t.name} to {cell_name(edit.get('col', 0), edit.get('row', 0))}",
        "resize": lambda: f"{t.name} to {edit.get('size')}",  # the size wanted: "bigger" would not tell 4 from 5
        "replace": lambda: f"{t.name} to {edit.get('color')} {edit.get('shape')}",
    }[op]()


# -----------------------------------------------------------------------------
# scene differences


def scene_changes(a, b):
    """Every difference from scene a to scene b, matched by object id. Sorted, deterministic."""
    ch = []
    if a.background != b.background:
        ch.append({"kind": "background", "id": -1, "from": a.background, "to": b.background, "significant": True})
    for o in a.objects:
        p = b.get(o.id)
        if p is None:
            ch.append({"kind": "removed", "id": o.id, "from": o.name, "to": None, "significant": True})
            continue
        if o.color != p.color:
            ch.append({"kind": "color", "id": o.id, "from": o.color, "to": p.color, "significant": True})
        if o.shape != p.shape:
            ch.append({"kind": "shape", "id": o.id, "from": o.shape, "to": p.shape, "significant": True})
        if o.size != p.size:
            ch.append({"kind": "size", "id": o.id, "from": o.size, "to": p.size, "significant": True})
        if (o.col, o.row) != (p.col, p.row):
            ch.append({"kind": "moved", "id": o.id, "from": cell_name(o.col, o.row), "to": cell_name(p.col, p.row), "significant": True})
        elif (o.dx, o.dy) != (p.dx, p.dy):
            ch.append({"kind": "nudged", "id": o.id, "from": None, "to": None, "significant": False})
        if o.tint != p.tint:
            ch.append({"kind": "tint", "id": o.id, "from": o.tint, "to": p.tint, "significant": False})
    for p in b.objects:
        if a.get(p.id) is None:
            ch.append({"kind": "added", "id": p.id, "from": None, "to": f"{p.size} {p.name} at {cell_name(p.col, p.row)}", "significant": True})
    return ch


def revert(a, b, changes):
    """Scene b with the given changes (from scene_changes(a, b)) undone: what a judge that missed them sees."""
    out = copy.deepcopy(b)
    for c in changes:
        if c["kind"] == "background":
            out.background = a.background
        elif c["kind"] == "added":
            out.objects = [o for o in out.objects if o.id != c["id"]]
        elif c["kind"] == "removed":
            out.objects.append(copy.deepcopy(a.get(c["id"])))
        else:
            src, dst = a.get(c["id"]), out.get(c["id"])
            if dst is None:
                continue
            attrs = {"color": ["color"], "shape": ["shape"], "size": ["size"], "moved": ["col", "row", "dx", "dy"],
                     "nudged": ["dx", "dy"], "tint": ["tint"]}[c["kind"]]
            for k in attrs:
                setattr(dst, k, getattr(src, k))
    out.objects.sort(key=lambda o: o.id)
    return out


def change_phrase(a, b, c):
    """One change in words, naming the object as it looked before."""
    who = a.get(c["id"]).name if c["id"] in {o.id for o in a.objects} else None
    k = c["kind"]
    if k == "background":
        return f"background {c['from']} to {c['to']}"
    if k == "added":
        return f"{c['to']} added"
    if k == "removed":
        return f"{c['from']} removed"
    if k == "color":
        return f"{who} recolored {c['to']}"
    if k == "shape":
        return f"{who} became a {c['to']}"
    if k == "size":  # both sizes: "enlarged" alone would not tell a medium from a large result (score 4 vs 5)
        return f"{who} {c['from']} to {c['to']}"
    if k == "moved":
        return f"{who} moved to {c['to']}"
    if k == "nudged":
        return f"{who} shifted slightly"
    return f"{who} {'darker' if c['to'] else 'lighter'}"


# -----------------------------------------------------------------------------
# ground truth for edits (rubrics of FIRM_NOTES section 2)


def requested_kinds(edit):
    """(id, kind) pairs the instruction asks for; such changes never count against consistency."""
    op = edit["op"]
    if op == "background":
        return {(-1, "background")}
    if op == "add":
        return {(edit["object"]["id"], "added")}
    t = edit["target"]
    return {
        "recolor": {(t, "color"), (t, "tint")},
        "remove": {(t, "removed")},
        "move": {(t, "moved"), (t, "nudged")},
        "resize": {(t, "size")},
        # attributes of an entity the instruction explicitly replaces are not counted
        "replace": {(t, "color"), (t, "shape"), (t, "tint"), (t, "size")},
    }[op]


def execution_score(src, out, edit):
    """Execution 1-5: is the requested change present and correct? Ignores everything else."""
    op, so = edit["op"], src
    changes = scene_changes(src, out)
    others = [c for c in changes if (c["id"], c["kind"]) not in requested_kinds(edit)]
    if op == "background":
        if out.background == edit["color"]:
            return 5
        return 3 if out.background != src.background else 1
    if op == "add":
        want = Obj(**edit["object"])
        new = [o for o in out.objects if so.get(o.id) is None]
        best = 1 if not new else 2
        for o in new:
            if o.shape == want.shape and o.color == want.color:
                best = max(best, 5 if (o.col, o.row) == (want.col, want.row) and o.size == want.size else 4)
            elif o.shape == want.shape or o.color == want.color:
                best = max(best, 3)
        return best
    s, t = so.get(edit["target"]), out.get(edit["target"])
    wrong_object = any(c["id"] != edit["target"] and c["kind"] in
                       {"recolor": ("color",), "remove": ("removed",), "move": ("moved",), "resize": ("size",),
                        "replace": ("shape", "color")}[op] for c in others)
    if op == "remove":
        if t is None:
            return 5
        if list(SIZES).index(t.size) < list(SIZES).index(s.size):
            return 3
        return 2 if (wrong_object or t.tint != s.tint) else 1
    if t is None:
        return 2 if op == "replace" else 1
    if op == "recolor":
        if t.color == edit["color"]:
            return 4 if t.tint else 5
        if t.color != s.color:
            return 3
    elif op == "move":
        dist = max(abs(t.col - edit["col"]), abs(t.row - edit["row"]))
        before = max(abs(s.col - edit["col"]), abs(s.row - edit["row"]))
        if dist == 0:
            return 5
        if (t.col, t.row) != (s.col, s.row):
            return 4 if dist == 1 and dist < before else (3 if dist < before else 2)
    elif op == "resize":
        step = list(SIZES).index(t.size) - list(SIZES).index(s.size)
        want = list(SIZES).index(edit["size"]) - list(SIZES).index(s.size)
        if t.size == edit["size"]:
            return 5
        if step * want > 0:
            return 4
        if step * want < 0:
            return 2
    elif op == "replace":
        hits = (t.shape == edit["shape"]) + (t.color == edit["color"])
        if hits == 2:
            return 5
        if hits == 1:
            return 3
    return 2 if wrong_object else 1


def unintended_changes(src, out, edit):
    return [c for c in scene_changes(src, out) if (c["id"], c["kind"]) not in requested_kinds(edit)]


def consistency_from_counts(n_significant, n_minor, different_image=False):
    """Consistency 1-5 from the number of unrequested changes (FIRM_NOTES section 2)."""
    if different_image:
        return 1
    if n_significant >= 4 or n_minor >= 5:
        return 2
    if n_significant >= 2 or n_minor >= 3:
        return 3
    if n_significant == 1 or n_minor >= 1:
        return 4
    return 5


def consistency_score(src, out, edit):
    un = unintended_changes(src, out, edit)
    sig = sum(c["significant"] for c in un)
    # "almost entirely different": the background and every object the edit leaves alone changed
    untouched = [o.id for o in src.objects if (o.id, "removed") not in requested_kinds(edit)
                 and not any(i == o.id for i, _ in requested_kinds(edit))]
    bg_changed = any(c["kind"] == "background" for c in un)
    objs_changed = all(any(c["id"] == i and c["significant"] for c in un) for i in untouched)
    different = bg_changed and objs_changed and sig >= 3
    return consistency_from_counts(sig, len(un) - sig, different)


# -----------------------------------------------------------------------------
# simulated editors


EDITORS = ("perfect", "partial", "wrong_object", "no_op", "extra_changes", "degraded", "different")


def simulate_editor(rng, src, edit, kind):
    """Returns (out_scene, degrade). The editors' quality spans the whole 1-5 range of both scores."""
    target = apply_edit(src, edit)
    if kind == "perfect":
        return target, None
    if kind == "no_op":
        return copy.deepcopy(src), None
    if kind == "degraded":
        return target, {rng.choice(["noise", "blur"]): rng.choice([1, 2])}
    if kind == "different":
        out = random_scene(rng)
        out.background = rng.choice([b for b in BACKGROUNDS if b != src.background])
        for i, o in enumerate(out.objects):
            o.id = 100 + i  # new objects: nothing of the source survives
        return out, None
    if kind == "extra_changes":
        return add_unintended(rng, target, edit, n=rng.choice([1, 2, 3, 4, 5])), None
    if kind == "wrong_object":
        others = [o for o in src.objects if o.id != edit.get("target")]
        if edit["op"] in ("recolor", "remove", "resize", "replace", "move") and others:
            wrong = dict(edit, target=rng.choice(others).id)
            if wrong["op"] == "recolor" and any(o.color == wrong["color"] for o in src.objects):
                wrong["color"] = rng.choice([c for c in COLORS if all(o.color != c for o in src.objects)])
            if wrong["op"] == "move":
                t = src.get(wrong["target"])
                cells = [c for c in src.free_cells(t.id) if c != (t.col, t.row)]
                if not cells:
                    return copy.deepcopy(src), None
                wrong["col"], wrong["row"] = rng.choice(cells)
            if wrong["op"] == "resize":
                wrong["size"] = "small" if src.get(wrong["target"]).size == "large" else "large"
            return apply_edit(src, wrong), None
        kind = "partial"  # nothing else to edit: fall through to a partial edit
    # partial: the main intent, with a detail or a significant part wrong
    op, out = edit["op"], copy.deepcopy(target)
    if op == "background":
        out.background = rng.choice([b for b in BACKGROUNDS if b not in (src.background, edit["color"])])
    elif op == "add":
        o = out.objects[-1]
        if rng.random() < 0.5 and len(out.free_cells(o.id)) > 1:
            o.col, o.row = rng.choice([c for c in out.free_cells(o.id) if c != (o.col, o.row)])
        else:
            o.color = rng.choice([c for c in COLORS if all(p.color != c for p in out.objects)])
    else:
        t, s = out.get(edit["target"]), src.get(edit["target"])
        if op == "recolor":
            if rng.random() < 0.5:
                t.tint = 1
            else:
                t.color = rng.choice([c for c in COLORS if c not in (s.color, edit["color"]) and all(o.color != c for o in src.objects)])
        elif op == "remove":
            out.objects.append(copy.deepcopy(s))
            t = out.get(s.id)
            if s.size == "large":
                t.size = "small"
            else:
                t.tint = 1
            out.objects.sort(key=lambda o: o.id)
        elif op == "move":
            near = [(c, r) for c, r in src.free_cells(t.id) if (c, r) != (s.col, s.row)
                    and max(abs(c - edit["col"]), abs(r - edit["row"])) == 1]
            if near:
                t.col, t.row = rng.choice(near)
            else:
                t.col, t.row = s.col, s.row
                t.dx = NUDGE if edit["col"] > s.col else -NUDGE
        elif op == "resize":
            t.size = "medium"
        elif op == "replace":
            if rng.random() < 0.5:
                t.color = s.color
            else:
                t.shape = s.shape
    return out, None


def add_unintended(rng, scene, edit, n):
    """`n` random changes to things the instruction does not mention (mostly significant, some minor)."""
    out = copy.deepcopy(scene)
    touched = {i for i, _ in requested_kinds(edit)}
    for _ in range(n):
        free = [o for o in out.objects if o.id not in touched]
        choices = ["background"] if (-1 not in touched) else []
        choices += ["nudge", "tint", "color", "size", "move"] if free else []
        kind = rng.choice(choices or ["background"])
        if kind == "background" or not free:
            if -1 in touched:
                break
            out.background = rng.choice([b for b in BACKGROUNDS if b != out.background])
            touched.add(-1)
            continue
        o = rng.choice(free)  # an object may take several changes
        if kind == "nudge":
            o.dx = rng.choice([-NUDGE, NUDGE])
        elif kind == "tint":
            o.tint = 1 - o.tint
        elif kind == "color":
            o.color = rng.choice([c for c in COLORS if all(p.color != c for p in out.objects)])
        elif kind == "size":
            o.size = "small" if o.size == "large" else "large"
        elif kind == "move":
            cells = [c for c in out.free_cells(o.id) if c != (o.col, o.row)]
            if cells:
                o.col, o.row = rng.choice(cells)
    return out


# -----------------------------------------------------------------------------
# generation: prompts, simulated generators, ground truth


def gen_prompt(scene, rng=None):
    """A text-to-image prompt that states every object, attribute and the background."""
    parts = [f"a {o.size} {o.color} {o.shape} at the {cell_name(o.col, o.row)}" for o in scene.objects]
    lead = (rng.choice(["A picture of", "An image showing", "Draw"]) if rng else "A picture of")
    return f"{lead} " + " and ".join(parts) + f", on a {scene.background} background."


def checklist(scene):
    """The analysis plan: main subjects, their attributes, composition. (item, kind, object id)."""
    items = []
    for o in scene.objects:
        items.append((f"a {o.name}", "main", o.id))
        items.append((f"the {o.name} is {o.size}", "detail-size", o.id))
        items.append((f"the {o.name} is at the {cell_name(o.col, o.row)}", "detail-position", o.id))
    items.append((f"the background is {scene.background}", "detail-background", -1))
    return items


def check_items(want, got):
    """For every checklist item of `want`: is it satisfied by scene `got`? Objects matched by id."""
    results = []
    for text, kind, oid in checklist(want):
        w, g = want.get(oid), got.get(oid)
        if kind == "main":
            ok = g is not None and g.shape == w.shape and g.color == w.color
        elif kind == "detail-size":
            ok = g is not None and g.size == w.size
        elif kind == "detail-position":
            ok = g is not None and (g.col, g.row) == (w.col, w.row)
        else:
            ok = got.background == want.background
        results.append((text, kind, oid, ok))
    return results


def instruction_score(want, got):
    """Instruction following 1-5 from the checklist (FIRM_NOTES section 2)."""
    res = check_items(want, got)
    main_bad = sum(1 for _, k, _, ok in res if k == "main" and not ok)
    detail_bad = sum(1 for _, k, _, ok in res if k != "main" and not ok)
    extras = sum(1 for o in got.objects if want.get(o.id) is None)
    detail_bad += extras
    n = len(want.objects)
    if main_bad == 0:
        return 5 if detail_bad == 0 else (4 if detail_bad <= 2 else 3)
    partial = sum(1 for o in want.objects if got.get(o.id) and (got.get(o.id).shape == o.shape or got.get(o.id).color == o.color))
    if main_bad < n:
        return 3
    return 2 if partial else 1


def quality_scores(degrade):
    """(aesthetics, technical quality, structure & texture), 1-5, from the rendering degradations."""
    d = degrade or {}
    return [5 - d.get("washed", 0), 5 - d.get("noise", 0), 5 - d.get("blur", 0)]


GENERATORS = ("correct", "missing_object", "wrong_attribute", "wrong_details", "irrelevant")


def simulate_generator(rng, want, kind):
    """Returns (scene, degrade): what a generator of this quality drew for the prompt of `want`."""
    got = copy.deepcopy(want)
    if kind == "missing_object":
        got.objects.remove(rng.choice(got.objects))
    elif kind == "wrong_attribute":
        o = rng.choice(got.objects)
        if rng.random() < 0.5:
            o.color = rng.choice([c for c in COLORS if all(p.color != c for p in got.objects)])
        else:
            o.shape = rng.choice([s for s in SHAPES if s != o.shape])
    elif kind == "wrong_details":
        for _ in range(rng.choice([1, 2, 3])):
            o = rng.choice(got.objects)
            what = rng.choice(["size", "position", "background"])
            if what == "size":
                o.size = "small" if o.size == "large" else "large"
            elif what == "position" and len(got.free_cells(o.id)) > 1:
                o.col, o.row = rng.choice([c for c in got.free_cells(o.id) if c != (o.col, o.row)])
            else:
                got.background = rng.choice([b for b in BACKGROUNDS if b != want.background])
    elif kind == "irrelevant":
        got = random_scene(rng)
        for i, o in enumerate(got.objects):
            o.id = 100 + i
        got.objects = [o for o in got.objects if all(o.color != w.color and o.shape != w.shape for w in want.objects)] or got.objects[:0]
    degrade = None
    if rng.random() < 0.4:  # rendering quality varies independently of instruction following
        degrade = {k: rng.choice([1, 2, 3, 4]) for k in rng.sample(["noise", "blur", "washed"], rng.choice([1, 1, 2]))}
    return got, degrade


# -----------------------------------------------------------------------------
# the oracle judge: the texts of the paper's curation pipelines


VERDICT = {5: "fully done", 4: "done, one detail off", 3: "partly done", 2: "barely done", 1: "not done"}
GEN_VERDICT = {5: "all correct", 4: "main content right, details off", 3: "several requirements missing",
               2: "most subjects missing or wrong", 1: "irrelevant image"}


class OracleJudge:
    """Knows the scenes; writes what a teacher MLLM writes. `noise` makes it imperfect.

    mode "report" (difference-first / plan-then-score, the paper's pipelines) misses fewer
    changes and details than mode "direct" (scoring without a report or plan).
    """

    MISS = {"report": {"minor": 1.0, "significant": 0.15, "jitter": 0.25},
            "direct": {"minor": 2.5, "significant": 0.8, "jitter": 0.5}}

    def __init__(self, noise=0.0, mode="report", seed=0):
        assert mode in self.MISS, mode
        self.noise, self.mode, self.seed = noise, mode, seed

    def _rng(self, key):
        return random.Random(f"{self.seed}:{self.mode}:{key}")

    def _p(self, what):
        return min(1.0, self.noise * self.MISS[self.mode][what])

    def _jitter(self, rng, score):
        if rng.random() < self._p("jitter"):
            score = min(5, max(1, score + rng.choice([-1, 1])))
        return score

    def perceive_edit(self, key, src, out):
        """The scene the judge believes it sees: some changes missed, small ones most often."""
        rng = self._rng(key)
        missed = [c for c in scene_changes(src, out)
                  if rng.random() < self._p("significant" if c["significant"] else "minor")]
        return revert(src, out, missed)

    # -- edit: difference report (two passes), then execution and consistency answers
    def difference_report(self, src, out):
        ch = scene_changes(src, out)
        obvious = [change_phrase(src, out, c) for c in ch if c["significant"]]
        lines = ["Obvious changes: " + ("; ".join(obvious) if obvious else "none") + "."]
        n0, n1 = len(src.objects), len(out.objects)
        lines.append(f"Quantity: {n0} object(s) before, {n1} after.")
        groups = {"Shape": ("shape", "added", "removed", "size"), "Texture/color": ("color", "tint", "background"),
                  "Position/layout": ("moved", "nudged")}
        for title, kinds in groups.items():
            items = [change_phrase(src, out, c) for c in ch if c["kind"] in kinds]
            lines.append(f"{title}: " + ("; ".join(items) if items else "no change") + ".")
        return "\n".join(lines)

    def judge_edit(self, key, src, out, edit):
        """Returns {"execution": (answer_text, score), "consistency": (answer_text, score)}."""
        seen = self.perceive_edit(key, src, out)
        rng = self._rng(key + ":j")
        ex = self._jitter(rng, execution_score(src, seen, edit))
        co = self._jitter(rng, consistency_score(src, seen, edit))
        relevant = [change_phrase(src, seen, c) for c in scene_changes(src, seen) if (c["id"], c["kind"]) in requested_kinds(edit)
                    or c["kind"] in ("added", "removed")]
        seen_txt = "; ".join(relevant) if relevant else "no requested change visible"
        # Both answers first describe the two images, then say what changed (as the judge sees it), then judge it:
        # the critic learns to look first. A tiny critic describes each image far more reliably than it compares
        # two images directly, and the change list can then be read off its own two descriptions.
        changed = (f"Image 1: {describe(src)}. Image 2: {describe(seen)}. Changes: "
                   + ("; ".join(change_phrase(src, seen, c) for c in scene_changes(src, seen)) or "nothing") + ".")
        ex_reason = f"{changed} Asked: {request_summary(src, edit)}. Seen: {seen_txt}. Execution {VERDICT[ex]}."
        un = unintended_changes(src, seen, edit)
        sig = sum(c["significant"] for c in un)
        un_txt = "; ".join(change_phrase(src, seen, c) for c in un) if un else "none"
        co_reason = f"{changed} Unrequested changes: {un_txt}. {sig} significant, {len(un) - sig} minor."
        return {"execution": (answer_json(ex_reason, [ex]), ex), "consistency": (answer_json(co_reason, [co]), co)}

    # -- generation: plan, then item-by-item analysis ending in \boxed{n}; quality ratings
    def plan(self, want):
        lines = ["Analysis plan:"]
        for i, (text, kind, _) in enumerate(checklist(want), 1):
            lines.append(f"{i}. {text} ({'main subject' if kind == 'main' else kind.split('-')[1]})")
        return "\n".join(lines)

    def judge_gen(self, key, want, got, degrade):
        """Returns {"instruction": (analysis_text, score), "quality": (answer_text, [a, t, s])}."""
        rng = self._rng(key)
        res = check_items(want, got)
        seen = copy.deepcopy(got)  # details the judge overlooks are taken as matching the prompt
        for text, kind, oid, ok in res:
            if ok or rng.random() >= self._p("minor" if kind != "main" else "significant"):
                continue
            w, g = want.get(oid), seen.get(oid)
            if kind == "detail-background":
                seen.background = want.background
            elif g is not None and kind == "detail-size":
                g.size = w.size
            elif g is not None and kind == "detail-position":
                g.col, g.row = w.col, w.row
            elif kind == "main":
                seen.objects = [o for o in seen.objects if o.id != oid] + [copy.deepcopy(w)]
        score = self._jitter(rng, instruction_score(want, seen))
        lines = []
        for i, (text, kind, oid, ok) in enumerate(check_items(want, seen), 1):
            lines.append(f"{i}. {text}: {'yes' if ok else 'no'}")
        extras = [o.name for o in seen.objects if want.get(o.id) is None]
        if extras:
            lines.append("Unrequested: " + ", ".join(extras) + ".")
        lines.append(f"Overall: {GEN_VERDICT[score]}. \\boxed{{{score}}}")
        q = [self._jitter(rng, s) for s in quality_scores(degrade)]
        words = {5: "clean", 4: "slight", 3: "visible", 2: "strong", 1: "severe"}
        q_reason = f"Aesthetics {words[q[0]]}, noise {words[q[1]]}, blur {words[q[2]]}."
        return {"instruction": ("\n".join(lines), score), "quality": (answer_json(q_reason, q), q)}


def answer_json(reasoning, score):
    return json.dumps({"reasoning": reasoning, "score": score})


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
# tiny models of the real classes, saved as ordinary model directories

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
# A ChatML template like Qwen's: content is a string or a list of {"type": "image"|"text"} parts.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_critic(out_dir, texts, image_size=64, hidden=128, layers=4, heads=4, vision_hidden=64,
                      vision_depth=2, vocab_size=1024, vision_steps=0, seed=0):
    """A randomly initialised Qwen3-VL critic base: model + locally trained tokenizer + real processor.

    The directory opens with AutoModelForImageTextToText / AutoProcessor like Qwen3-VL-8B-Instruct.
    `texts` (prompts and answers of the world) train the byte-level BPE tokenizer; `vision_steps` > 0
    pre-trains the vision tower on the world's scenes (pretrain_vision), the language model stays random.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (PreTrainedTokenizerFast, Qwen2VLImageProcessor, Qwen3VLConfig,
                              Qwen3VLForConditionalGeneration, Qwen3VLProcessor, Qwen3VLVideoProcessor)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=QWEN_SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  chat_template=QWEN_CHAT_TEMPLATE)
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL[1:]})
    # one image = (size/8)^2 patches of 8 px, merged 2x2 -> (size/16)^2 tokens (16 at 64 px)
    image_proc = Qwen2VLImageProcessor(min_pixels=image_size ** 2, max_pixels=image_size ** 2, patch_size=8,
                                       merge_size=2, temporal_patch_size=2)
    proc = Qwen3VLProcessor(image_processor=image_proc, tokenizer=tok, video_processor=Qwen3VLVideoProcessor(),
                            chat_template=QWEN_CHAT_TEMPLATE)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    head_dim = hidden // heads
    half = head_dim // 2  # mrope sections (t, h, w) must add up to head_dim / 2
    cfg = Qwen3VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, head_dim=head_dim,
                         max_position_embeddings=4096, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [half - 2 * (half // 3), half // 3, half // 3],
                                          "mrope_interleaved": True},
                         bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=vision_hidden * 2, num_heads=4,
                           patch_size=8, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=hidden,
                           num_position_embeddings=(image_size // 8) ** 2, deepstack_visual_indexes=[vision_depth - 1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(cfg)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    if vision_steps:
        pretrain_vision(model, image_proc, vision_steps, size=image_size, seed=seed)
    model.save_pretrained(out_dir)
    proc.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())


# The tiny critic's vision tower, pre-trained on the world. A real Qwen3-VL arrives with a pre-trained vision
# encoder; a random one learns to see only through the text loss, and slowly: after the seeing stage
# (train_reward.py --task vlm, 1 epoch) a random-init base described 1 of 80 validation image pairs exactly
# (positions and shapes mostly wrong), the same stage on a tower pre-trained here for 2000 steps (~2 CPU-min)
# 44 of 80, and the edit critic trained from it reached eval loss 0.107 instead of 0.148 (same data and steps).
# Linear heads on the features the decoder receives (the merger's output and the deepstack features) learn
# to read off each image token what it shows; the heads are then dropped.

VISION_TOKEN_PX, VISION_BLOCK_PX = 16, 4  # an LLM image token = 2x2 merged patches of 8 px; label blocks of 4 px
N_PIXEL_CLASSES = len(BACKGROUNDS) + 2 * len(COLORS)  # background colours, object colours, tinted object colours
DENSE_CLASSES = {"blocks": N_PIXEL_CLASSES, "shape": len(SHAPES) + 1, "size": len(SIZES) + 1, "cell": 9 + 1}


def dense_labels(scene, size=64):
    """What each LLM image token of `scene` shows (tokens of 16x16 px, row-major), as class indices:
    "blocks": the class at the centre of each of its 4x4-px blocks (background colour, object colour, or tinted
    object colour); "shape", "size", "cell": those of the object covering most of the token (>= 10% of it), or
    the last class ("none")."""
    t, b, n = VISION_TOKEN_PX, VISION_BLOCK_PX, size // VISION_TOKEN_PX
    pixel = np.full((size, size), list(BACKGROUNDS).index(scene.background))
    shape, sz, cell = (np.full((size, size), -1) for _ in range(3))
    for o in scene.objects:  # drawn in order, so a later object covers an earlier one, as in render()
        m = object_mask(scene, o.id, size)
        pixel[m] = len(BACKGROUNDS) + list(COLORS).index(o.color) + (len(COLORS) if o.tint else 0)
        shape[m], sz[m], cell[m] = SHAPES.index(o.shape), list(SIZES).index(o.size), o.row * 3 + o.col
    tiles = lambda a: a.reshape(n, a.shape[0] // n, n, a.shape[1] // n).transpose(0, 2, 1, 3).reshape(n * n, -1)

    def covering(a, none):
        return np.array([np.bincount(v[v >= 0]).argmax() if (v >= 0).sum() >= t * t // 10 else none for v in tiles(a)])
    return {"blocks": tiles(pixel[b // 2::b, b // 2::b]), "shape": covering(shape, len(SHAPES)),
            "size": covering(sz, len(SIZES)), "cell": covering(cell, 9)}


def _vision_batch(rng, n, size):
    """n images: random sources and their edits by every kind of simulated editor (tints, nudges, degradations)."""
    import torch
    images, labels = [], []
    while len(images) < n:
        src = random_scene(rng)
        out, degrade = simulate_editor(rng, src, random_edit(rng, src), rng.choice(EDITORS))
        for scene, deg in ((src, None), (out, degrade)):
            images.append(render(scene, size, deg, seed=rng.randrange(1 << 30)))
            labels.append(dense_labels(scene, size))
    return images, {k: torch.as_tensor(np.stack([lab[k] for lab in labels])) for k in DENSE_CLASSES}


def pretrain_vision(model, image_processor, steps, size=64, batch=32, lr=2e-3, seed=0, log=print):
    """Train `model.model.visual` (a Qwen3-VL vision tower) to predict dense_labels from its output features.
    Returns the held-out accuracy of each label kind at the end."""
    import torch
    import torch.nn.functional as F
    vis = model.model.visual
    per_token = {k: (VISION_TOKEN_PX // VISION_BLOCK_PX) ** 2 if k == "blocks" else 1 for k in DENSE_CLASSES}
    n_out = sum(per_token[k] * c for k, c in DENSE_CLASSES.items())
    heads = torch.nn.ModuleList(torch.nn.Linear(model.config.vision_config.out_hidden_size, n_out)
                                for _ in range(1 + len(model.config.vision_config.deepstack_visual_indexes)))
    opt = torch.optim.AdamW([*vis.parameters(), *heads.parameters()], lr=lr, weight_decay=0.0)
    rng, held_out = random.Random(seed), _vision_batch(random.Random(f"{seed}:held-out"), 128, size)

    def loss_and_accuracy(images, labels):
        enc = image_processor(images=images, return_tensors="pt")
        out = vis(enc["pixel_values"], grid_thw=enc["image_grid_thw"])
        loss, correct = 0.0, {}
        for head, feats in zip(heads, [out.pooler_output, *out.deepstack_features]):
            logits = head(feats).view(len(images), -1, n_out)  # (image, token, all label logits)
            start = 0
            for k, c in DENSE_CLASSES.items():
                y = labels[k].reshape(-1)
                part = logits[..., start:start + per_token[k] * c].reshape(-1, c)
                start += per_token[k] * c
                loss = loss + F.cross_entropy(part, y)
                correct.setdefault(k, (part.argmax(-1) == y).float().mean().item())
        return loss, correct  # accuracy of the merger's features (the first head)

    warmup = max(1, steps // 20)
    for step in range(steps):
        for g in opt.param_groups:  # linear warmup, cosine decay
            g["lr"] = lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss, _ = loss_and_accuracy(*_vision_batch(rng, batch, size))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vis.parameters(), 1.0)
        opt.step()
        if (step + 1) % 250 == 0 or step + 1 == steps:
            with torch.no_grad():
                held_loss, acc = loss_and_accuracy(*held_out)
            log(f"vision pre-training step {step + 1}/{steps}: held-out loss {held_loss.item():.3f}, accuracy "
                + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    with torch.no_grad():
        return loss_and_accuracy(*held_out)[1]


# CLI commands: each section registers its own as name -> (add_arguments(parser), run(args))
COMMANDS = {}


# -----------------------------------------------------------------------------
# tiny generation policy (SD3): a diffusers StableDiffusion3Pipeline directory, pre-trained here by flow matching
#
# The real classes (SD3Transformer2DModel, two CLIPTextModelWithProjection + CLIPTokenizer, the flow-matching
# scheduler), tiny and randomly initialised, then taught to draw the world by plain flow matching so that RL
# (rl_gen.py) starts from a policy that already draws scenes. Deviations from SD3.5: no VAE (the transformer
# works on 32x32 RGB pixels, "latents = pixels"), no T5 encoder (text_encoder_3 = None), a BPE tokenizer trained
# on the world's prompts. Sizes from MINIATURE_NOTES (0.97 M parameters). Measured (shared 2-core CPU, 1 thread):
# 1500 steps at lr 3e-3 take ~3.7 CPU-min; only then do samples show coherent objects in the prompt's colours
# (mostly at wrong places); at 400-600 steps they are scattered coloured patches.

GEN_SIZE = 32  # pixels; the critic sees these upsampled to 64 (rl_gen.py --reward-image-size)


def _clip_tokenizer(texts, vocab_size=400, max_length=32):
    """A CLIPTokenizer (same normaliser, pre-tokeniser and </w> BPE as CLIP's) trained on `texts`."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    bpe = Tokenizer(models.BPE(unk_token=eos, end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"),
                             behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[bos, eos], show_progress=False,
                                                       initial_alphabet=alphabet, end_of_word_suffix="</w>"))
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    # the trainer numbers single characters in a per-process random order: renumber them (sorted), so that two runs
    # build the same tokenizer and hence the same model
    merged = [a + b for a, b in merges]
    singles = sorted(set(model["vocab"]) - set(merged) - {bos, eos})
    vocab = {t: i for i, t in enumerate(dict.fromkeys([bos, eos] + singles + merged))}
    for ch in sorted(alphabet):  # every byte also as a word end, as in CLIP's vocabulary: no <unk> for odd words
        vocab.setdefault(ch + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length), vocab, merges


def world_prompts(n=3000, seed=0):
    """Prompts over random scenes (every word of the world appears many times)."""
    rng = random.Random(f"{seed}:gen-prompts")
    return [gen_prompt(random_scene(rng), rng) for _ in range(n)]


def build_tiny_generator(out_dir, texts=None, size=GEN_SIZE, seed=0):
    """A randomly initialised tiny SD3 pipeline saved as an ordinary diffusers directory (no VAE, no T5).

    Open it with rl_gen.load_generator(out_dir), or StableDiffusion3Pipeline.from_pretrained(out_dir,
    vae=None, text_encoder_3=None, tokenizer_3=None). Returns the transformer's parameter count.
    """
    import os
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tok, vocab, merges = _clip_tokenizer(texts or world_prompts())

    def text_encoder(s):  # CLIP-L / CLIP-G stand-ins: hidden 32 each, so concatenated = joint_attention_dim 64
        torch.manual_seed(s)
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=tok.model_max_length, projection_dim=32, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=size, patch_size=4, in_channels=3, out_channels=3, num_layers=3,
                                        attention_head_dim=24, num_attention_heads=4, joint_attention_dim=64,
                                        caption_projection_dim=96, pooled_projection_dim=64, pos_embed_max_size=size // 4)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), vae=None,
                                    text_encoder=text_encoder(seed + 1), tokenizer=tok, text_encoder_2=text_encoder(seed + 2),
                                    tokenizer_2=tok, text_encoder_3=None, tokenizer_3=None)
    import logging
    logging.getLogger("diffusers").setLevel(logging.ERROR)  # "vae=None cannot be saved" is what we want
    pipe.save_pretrained(out_dir)
    for sub in ("tokenizer", "tokenizer_2"):  # the classic CLIP files too, for loaders that want them
        d = os.path.join(out_dir, sub)
        with open(os.path.join(d, "vocab.json"), "w") as f:
            json.dump(vocab, f)
        with open(os.path.join(d, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return sum(p.numel() for p in transformer.parameters())


def _pretrain_gen_args(ap):
    ap.add_argument("--out", default="runs/mini/models/gen-base", help="diffusers directory to write")
    ap.add_argument("--steps", type=int, default=1500, help="flow-matching steps (~0.1-0.3 s each on one CPU thread)")
    ap.add_argument("--batch-size", type=int, default=32, help="images per step")
    ap.add_argument("--lr", type=float, default=3e-3, help="AdamW peak learning rate (cosine decay to 0)")
    ap.add_argument("--size", type=int, default=GEN_SIZE, help="image side in pixels")
    ap.add_argument("--freeze-text-encoders", action="store_true", help="train the transformer only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")


def _pretrain_gen(args):
    """Build the tiny generator and pre-train it by rectified-flow matching on rendered scenes.

    The tiny CLIP encoders are trained too (random frozen ones carry the prompt poorly); RL freezes them."""
    import time
    from pathlib import Path
    import torch
    import rl_gen
    import shutil
    from common import pil_to_tensor, replace_dir, seed_everything
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    # built and trained in <out>.tmp, renamed at the end: a killed run never leaves an untrained generator at --out
    out, tmp = Path(args.out), Path(str(args.out) + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    n = build_tiny_generator(str(tmp), size=args.size, seed=args.seed)
    gen = rl_gen.load_generator(tmp, device="cpu")
    modules = [gen.transformer] + ([] if args.freeze_text_encoders else [gen.pipe.text_encoder, gen.pipe.text_encoder_2])
    params = [p for m in modules for p in m.requires_grad_(True).train().parameters()]  # load_generator froze them
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / args.steps, 1.0))))
    rng = random.Random(f"{args.seed}:pretrain-gen")
    print(f"tiny SD3 generator: {n / 1e6:.2f} M transformer parameters, {args.steps} steps x {args.batch_size} images")
    t0, avg = time.time(), None
    for step in range(1, args.steps + 1):
        scenes = [random_scene(rng) for _ in range(args.batch_size)]
        x0 = torch.stack([pil_to_tensor(render(s, args.size)) for s in scenes])
        emb, pooled = rl_gen.encode_prompts(gen, [gen_prompt(s, rng) for s in scenes])
        t = torch.rand(args.batch_size)
        eps = torch.randn_like(x0)
        v = rl_gen.velocity(gen.transformer, rl_gen.rectified_flow_interp(x0, eps, t), t, emb, pooled)
        loss = ((v - (eps - x0)) ** 2).mean()  # flow matching: the velocity of x_t = (1-t) x0 + t eps is eps - x0
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        avg = loss.item() if avg is None else 0.95 * avg + 0.05 * loss.item()
        if step % 50 == 0 or step == args.steps:
            print(f"step {step:5d} | loss {avg:.4f} | {time.time() - t0:.0f} s", flush=True)
    for name, m in zip(("transformer", "text_encoder", "text_encoder_2"), modules):
        m.eval().save_pretrained(tmp / name)
    replace_dir(tmp, out)
    print(f"wrote {out} ({time.time() - t0:.0f} s)")


COMMANDS["pretrain-gen"] = (_pretrain_gen_args, _pretrain_gen)


# -----------------------------------------------------------------------------
# tiny editing policy (Qwen-Image-Edit): the real classes, pre-trained briefly by flow matching
#
# A QwenImageTransformer2DModel, a randomly initialised (frozen) Qwen2.5-VL text encoder with a locally
# trained tokenizer and the real processor, and the real scheduler config, saved by the real pipeline
# class as an ordinary diffusers directory. There is no VAE (a random AutoencoderKLQwenImage would
# destroy the images): rl_edit.encode_latents rearranges the 32 px pixels space-to-depth (2x2 -> 12
# channels, lossless), the 2x2 packing makes 8x8 = 64 tokens of 48 features per image.

EDIT_RESOLUTION = 32  # px the tiny editor works at; sources and results are 64 px like the rest of the world


def _tiny_qwen_tokenizer(texts, vocab_size):
    """A byte-level BPE tokenizer with Qwen's special tokens, trained on the world's texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=QWEN_SPECIAL, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  chat_template=QWEN_CHAT_TEMPLATE)
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL[1:]})
    return tok


def build_tiny_editor(out_dir, texts, resolution=EDIT_RESOLUTION, layers=3, heads=3, head_dim=32, s2d=2, text_hidden=64,
                      text_layers=2, vocab_size=1024, seed=0):
    """A randomly initialised tiny Qwen-Image-Edit directory that QwenImageEditPlusPipeline.from_pretrained opens."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor
    tok = _tiny_qwen_tokenizer(texts, vocab_size)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    # the text encoder sees the source at 32 px: 4x4 patches of 8 px, merged 2x2 -> 4 image tokens
    proc = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=32 * 32, max_pixels=32 * 32, patch_size=8,
                                                                  merge_size=2, temporal_patch_size=2),
                            tokenizer=tok, video_processor=Qwen2VLVideoProcessor(), chat_template=QWEN_CHAT_TEMPLATE)
    half = text_hidden // 4 // 2  # 4 heads; mrope sections (t, h, w) add up to head_dim / 2
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=text_hidden, intermediate_size=2 * text_hidden,
                         num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=4096, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [half - 2 * (half // 3), half // 3, half // 3]},
                         bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=32, out_hidden_size=text_hidden, fullatt_block_indexes=[1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True)
    torch.manual_seed(seed)
    text_encoder = Qwen2_5_VLForConditionalGeneration(cfg)
    # RoPE dims (frame, h, w) add up to head_dim. The frame axis only tells target (0) from source (1): 4 dims;
    # h and w get the rest, so that their slower frequencies (theta 10000) can tell 8 token positions apart and
    # a target token finds the source token at its own position (how the editor copies what it keeps).
    rope = (head_dim - 4) // 2
    c = 3 * s2d * s2d  # latent channels: pixels space-to-depth by s2d
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=4 * c, out_channels=c, num_layers=layers,
                                              attention_head_dim=head_dim, num_attention_heads=heads,
                                              joint_attention_dim=text_hidden, axes_dims_rope=(4, rope, rope))
    # Qwen-Image's scheduler config: exponential shift growing with the token count, terminal noise 0.02
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
                                                max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential")
    QwenImageEditPlusPipeline(scheduler=scheduler, vae=None, text_encoder=text_encoder, tokenizer=tok, processor=proc,
                              transformer=transformer).save_pretrained(out_dir)
    with open(f"{out_dir}/firm_edit.json", "w") as f:
        json.dump({"resolution": resolution, "latents": "no VAE: pixels space-to-depth 2x2 (rl_edit.encode_latents)"}, f, indent=2)
    return sum(p.numel() for p in transformer.parameters())


def edit_triple(rng):
    """One (source scene, edit, target scene, instruction) of the world, for pre-training and tests."""
    src = random_scene(rng)
    e = random_edit(rng, src)
    return src, e, apply_edit(src, e), instruction(src, e, rng)


def judge_editor(editor, triples, steps=6, seed=0, size=64):
    """Mean pixel_judge_edit of the editor's results (upsampled to `size`) on (src, edit, target, instruction)s."""
    import rl_edit
    outs = rl_edit.edit(editor, [render(t[0], size) for t in triples], [t[3] for t in triples],
                        [seed + i for i in range(len(triples))], steps=steps)
    js = [pixel_judge_edit(o, t[0], t[2]) for o, t in zip(outs, triples)]
    return {k: float(np.mean([j[k] for j in js])) for k in js[0]}, outs


def _pretrain_edit_args(ap):
    ap.add_argument("--out", default="runs/mini/models/edit-base", help="output diffusers directory")
    ap.add_argument("--steps", type=int, default=500, help="optimizer steps (~0.26 s each on an idle core)")
    ap.add_argument("--seconds", type=float, default=None, help="stop earlier after this many wall-clock seconds")
    ap.add_argument("--batch", type=int, default=32, help="(source, instruction, target) triples per step")
    ap.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate")
    ap.add_argument("--layers", type=int, default=3, help="transformer blocks")
    ap.add_argument("--heads", type=int, default=3, help="attention heads")
    ap.add_argument("--head-dim", type=int, default=32, help="channels per head")
    ap.add_argument("--s2d", type=int, default=2, help="pixels per latent cell along a side (space-to-depth, no VAE)")
    ap.add_argument("--eval", type=int, default=64, help="held-out triples for the pixel judge at the end")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0)


def _pretrain_edit(args):
    """Flow matching on (source, instruction, target) triples: v = eps - x0 for the target x0 given the source."""
    import shutil
    import time
    from pathlib import Path
    import torch
    import rl_edit
    from common import image_grid, replace_dir
    from rl_gen import rectified_flow_interp
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(f"pretrain-edit:{args.seed}")
    # the tokenizer learns the edit chat template too, so its system turn is 64 tokens (as Qwen's), not 217 bytes
    texts = [edit_triple(rng)[3] for _ in range(3000)] + [rl_edit.SYSTEM_PREFIX + rl_edit.USER_TURN] * 100
    # built and trained in <out>.tmp, renamed at the end: a killed run never leaves a random editor at --out
    out, tmp = Path(args.out), Path(str(args.out) + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    n = build_tiny_editor(str(tmp), texts, layers=args.layers, heads=args.heads, head_dim=args.head_dim, s2d=args.s2d, seed=args.seed)
    editor = rl_edit.load_editor(tmp, device="cpu")
    tr = editor.transformer.train()
    print(f"tiny editor: {n / 1e6:.2f} M transformer parameters, {EDIT_RESOLUTION} px, {args.batch} triples/step, "
          f"{args.steps} steps")
    held_out = [edit_triple(random.Random(f"edit-eval:{i}")) for i in range(args.eval)]
    opt = torch.optim.AdamW(tr.parameters(), lr=args.lr, weight_decay=0.0)
    t0, step, losses = time.time(), 0, []
    while step < args.steps and (args.seconds is None or time.time() - t0 < args.seconds):
        batch = [edit_triple(rng) for _ in range(args.batch)]
        srcs = [render(b[0], 64) for b in batch]
        _, src, (h, w) = rl_edit.prepare_sources(editor, srcs)
        _, x0, _ = rl_edit.prepare_sources(editor, [render(b[2], 64) for b in batch])
        embeds, mask = rl_edit.encode_prompt(editor, [b[3] for b in batch], srcs)
        t, eps = torch.rand(len(batch)), torch.randn_like(x0)
        x_t = rectified_flow_interp(x0, eps, t)
        v = rl_edit.predict_velocity(tr, x_t, src, t, embeds, mask, (h // 2, w // 2))
        loss = torch.nn.functional.mse_loss(v, eps - x0)  # the velocity target of rectified flow
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tr.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % 50 == 0:
            print(f"step {step:5d} | loss {np.mean(losses[-50:]):.4f} | {time.time() - t0:.0f} s", flush=True)
    tr.eval()
    tr.save_pretrained(tmp / "transformer")
    with torch.no_grad():
        judged, outs = judge_editor(editor, held_out)
    noop = {k: float(np.mean([pixel_judge_edit(render(t[0], 64), t[0], t[2])[k] for t in held_out])) for k in judged}
    print(f"pre-trained {step} steps in {time.time() - t0:.0f} s; pixel judge on {len(held_out)} held-out edits: "
          f"edited {judged['edited']:.3f} kept {judged['kept']:.3f} overall {judged['overall']:.3f} "
          f"(returning the source unchanged: edited {noop['edited']:.3f} kept {noop['kept']:.3f} overall {noop['overall']:.3f})")
    rows = [[render(t[0], 64), o, render(t[2], 64)] for t, o in zip(held_out[:8], outs)]
    image_grid(rows).save(tmp / "pretrain_edits.png")
    with open(tmp / "pretrain_edit.json", "w") as f:
        json.dump({"args": vars(args), "steps": step, "final_loss": float(np.mean(losses[-50:])), "pixel_judge": judged,
                   "noop_pixel_judge": noop}, f, indent=2)
    replace_dir(tmp, out)
    print(f"wrote {out} (pretrain_edits.png: source | edit | target)")


COMMANDS["pretrain-edit"] = (_pretrain_edit_args, _pretrain_edit)


# -----------------------------------------------------------------------------
# CLI


def _show_args(ap):
    ap.add_argument("--out", default="runs/mini/toy_examples.png")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--seed", type=int, default=0)


def _show(args):
    """A picture of the world: sources, then every simulated editor's output, with execution scores."""
    from pathlib import Path
    from common import image_grid
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


COMMANDS["show"] = (_show_args, _show)


def main(argv=None):
    ap = argparse.ArgumentParser(description="The FIRM miniature world")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, (add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    args = ap.parse_args(argv)
    COMMANDS[args.cmd][1](args)


if __name__ == "__main__":
    main()
