"""The miniature world: procedurally drawn scenes with exactly known ground truth.

Every stage of the paper runs on this world on a laptop CPU, through the same code paths the real
models use. This module holds the world itself:
  - scenes (1-2 coloured shapes on a background) rendered with PIL, and their descriptions;
  - edits (recolour, remove, add, move, resize, replace, background) with exact target scenes and
    their instructions;
  - the difference between two scenes, in data and in words;
  - text-to-image prompts written from scenes, and the checklists a judge plans its analysis with.
The rest of the package: rubrics.py (ground-truth scores, simulated editors and generators), oracle.py (the
teacher that writes the curation texts), judges.py (the exact pixel judge), models.py (tiny models of the real
classes), pretrain.py (pre-training the tiny policies), data.py (the world's data sets), __main__.py (CLI).
"""

import copy
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
# generation: prompts and checklists


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


def item_value(scene, kind, oid):
    """What `scene` shows for one checklist item: the object's colour and shape, its size, its cell, or the background;
    "none" for an object it lacks. An item of the prompt's scene is satisfied when the image's value is the prompt's."""
    if kind == "detail-background":
        return scene.background
    o = scene.get(oid)
    if o is None:
        return "none"
    return {"main": o.name, "detail-size": o.size, "detail-position": cell_name(o.col, o.row)}[kind]


def check_items(want, got):
    """(text, kind, object id, satisfied) for every checklist item of `want`: satisfied when scene `got` shows the
    item's value (item_value), objects matched by id."""
    return [(text, kind, oid, item_value(got, kind, oid) == item_value(want, kind, oid))
            for text, kind, oid in checklist(want)]



def edit_triple(rng):
    """One (source scene, edit, target scene, instruction) of the world, for pre-training and tests."""
    src = random_scene(rng)
    e = random_edit(rng, src)
    return src, e, apply_edit(src, e), instruction(src, e, rng)

