"""Ground truth that follows the FIRM rubrics (FIRM_NOTES section 2), and simulated editors and generators.

The scores are computed from the scene difference: execution / consistency for edits, instruction following and
three quality ratings for generations. The simulated editors (perfect, partial, wrong object, no-op, extra
changes, degraded, different image) and generators (correct, missing object, wrong attribute, wrong details,
degraded, irrelevant) produce outputs whose scores span the whole 1-5 range.
"""

import copy

from toy.world import BACKGROUNDS, COLORS, NUDGE, SHAPES, SIZES, Obj, apply_edit, check_items, random_scene, scene_changes

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
# ground truth for generations


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
# simulated generators


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

