"""The teacher's perception: a scene read back from the pixels, as an MLLM judge reads the image it is shown.

The simulated candidates come with their scenes; the tiny policies' own samples (python -m toy policy-candidates)
come with pixels only. The world's flat colours make reading them back simple and, on clean renders, exact:
  1. noise: estimated from how far pixels sit from their 3x3 median, and median-filtered away;
  2. washed-out contrast: the contrast of WASH_CONTRAST under which the pixels lie closest to the world's colours;
  3. background: the world's background colour most pixels match;
  4. objects: connected regions of pixels that are a mix of one object colour (plain or tinted, world.TINT) and the
     background, more object than background; tiny specks are ignored;
  5. each region by analysis by synthesis: the shape and size whose rendering (world.render) at the cell nearest
     the region's centre, shifted by a "minor" world.NUDGE where the centre sits off the cell, covers it best.
     A clipped object at the image border is clipped in the rendering too, so no fill-ratio threshold moves;
  6. the degradation (the quality rubric's input) by synthesis too: the noise and blur whose renderings of the scene
     read look like the image; what none explains (a policy's blotches) counts as blur, a defect of structure.
It reads the renders of random scenes back exactly (tests/test_toy.py) and blurry samples plausibly but not
exactly: realistic perception errors, where a noisy teacher's (toy.oracle) are drawn at random.
"""

import copy

import numpy as np
from PIL import Image, ImageFilter

from toy.judges import object_mask
from toy.world import (BACKGROUNDS, BLUR_RADIUS, CELL_CENTRES, COLORS, NOISE_SIGMA, NUDGE, SHAPES, SIZES, TINT,
                       WASH_CONTRAST, Obj, Scene, apply_edit, render)

OBJECT_RGB = np.array([[v * (TINT if tint else 1) for v in rgb] for rgb in COLORS.values() for tint in (0, 1)])  # (12, 3)
PALETTE = np.concatenate([OBJECT_RGB, np.array(list(BACKGROUNDS.values()), dtype=np.float64)])  # (16, 3)
TOLERANCE = 60.0  # RGB distance from the world's colours (and their mixes with the background) that still counts
SPECK = 0.015  # regions under this share of the image are specks, not objects (the smallest object is ~0.05)
ARTEFACT = 10.0  # RMS from the image's clean rendering per level of blur (world.render's blur 4 is 12-30 from it)
TRIANGLE_DROP = 0.2333  # a triangle's centroid sits this many radii below its centre (apex at -1, base at +0.85)


def pixels_of(im):
    return np.asarray(im, dtype=np.float64)


def noise_level(im):
    """Median |pixel - its 3x3 median|: 0 for flat colours, and 7 / 13 / 22 / 31 under world.render's noise 1-4."""
    return float(np.median(np.abs(pixels_of(im) - pixels_of(im.filter(ImageFilter.MedianFilter(3))))))


def distance(x, palette):
    """(..., K) RGB distances of the pixels x (..., 3) to the colours of `palette` (K, 3)."""
    return np.linalg.norm(x[..., None, :] - palette, axis=-1)


def perceive(img):
    """(Scene, degrade): the scene in the image, ids 0..n-1 in reading order, and the degradation it seems to have
    ({"noise" | "blur" | "washed": severity 1-4}, or None for a clean image)."""
    im = img.convert("RGB")
    S, grain = im.width, noise_level(im)
    denoise = lambda im: im.filter(ImageFilter.MedianFilter(5 if grain > 17 else 3)) if grain > 3 else im
    x = seen = pixels_of(denoise(im))
    # washed out: the contrast under which the pixels lie closest to the world's colours (every 2nd pixel suffices)
    fit = lambda c: np.minimum(distance(128 + (x[::2, ::2] - 128) / c, PALETTE).min(-1), TOLERANCE).mean()
    washed = min(range(len(WASH_CONTRAST)), key=lambda w: fit(WASH_CONTRAST[w]))
    x = np.clip(128 + (x - 128) / WASH_CONTRAST[washed], 0, 255)
    background = min(BACKGROUNDS, key=lambda b: -(distance(x[::2, ::2], np.array([BACKGROUNDS[b]])) < TOLERANCE).sum())
    # every pixel as background + a (object colour - background), a in [0, 1]: blurred edges are such mixes
    B = np.array(BACKGROUNDS[background], dtype=np.float64)
    d = OBJECT_RGB - B  # (12, 3)
    a = np.clip(((x - B) @ d.T) / (d * d).sum(1), 0, 1)  # (H, W, 12)
    resid = np.linalg.norm(x[:, :, None] - (B + a[..., None] * d), axis=-1)  # (H, W, 12)
    resid[a <= 0.5] = np.inf  # more background than object
    label = np.where(resid.min(-1) < TOLERANCE, resid.argmin(-1), -1)  # (H, W): index into OBJECT_RGB, -1 none
    objects = [read_object(S, label, pixels) for pixels in regions(np.where(label >= 0, label // 2, -1))
               if len(pixels) >= SPECK * S * S]
    objects.sort(key=lambda o: (o.row, o.col))
    for i, o in enumerate(objects):
        o.id = i
    scene = Scene(background, objects)
    # the degradation by synthesis, rendering the scene read: the noise whose rendering has the image's noise level,
    # then the blur whose rendering (with that noise, through the same median filter) is as sharp as the image
    noisy = lambda n: noise_level(render(scene, S, {"washed": washed, "noise": n}, seed=n))
    noise = min(range(len(NOISE_SIGMA)), key=lambda n: abs(noisy(n) - grain)) if grain > 3 else 0
    sharp = lambda y: np.square(np.diff(y, axis=0)).mean() + np.square(np.diff(y, axis=1)).mean()
    blur = min(range(len(BLUR_RADIUS)), key=lambda b: abs(np.log(sharp(pixels_of(denoise(render(
        scene, S, {"blur": b, "washed": washed, "noise": noise}, seed=b)))) + 1) - np.log(sharp(seen) + 1)))
    if not noise:  # what no degradation of the world explains (a policy's blotches, torn shapes) is a defect of structure
        rms = np.sqrt(np.square(pixels_of(render(scene, S, {"blur": blur, "washed": washed})) - seen).mean())
        blur = max(blur, min(4, int(rms / ARTEFACT)))
    degrade = {k: v for k, v in (("noise", noise), ("blur", blur), ("washed", washed)) if v}
    return scene, degrade or None


def read_back(img, scene, edit=None):
    """(Scene, degrade) of `img` as the teacher reads a sample made for `scene` (and `edit`): perceive, then each
    object given the id of the prompt's object it is (or of the edit's target scene's), match_ids."""
    seen, degrade = perceive(img)
    return match_ids(seen, scene, *([apply_edit(scene, edit)] if edit is not None else [])), degrade


def regions(cls):
    """Regions of one class >= 0 of an (H, W) int array, as (N, 2) arrays of (y, x): 4-connected once each class is
    grown by a pixel, so that the fragments of one blurry blob, up to 2 pixels apart, are one region."""
    H, W = cls.shape
    out = []
    for c in np.unique(cls[cls >= 0]):
        grown = np.asarray(Image.fromarray((cls == c).astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(3))) > 0
        seen = ~grown
        for y0, x0 in zip(*np.nonzero(grown)):
            if seen[y0, x0]:
                continue
            seen[y0, x0], stack, pixels = True, [(y0, x0)], []
            while stack:
                y, x = stack.pop()
                pixels += [(y, x)] if cls[y, x] == c else []
                for v, u in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                    if 0 <= v < H and 0 <= u < W and not seen[v, u]:
                        seen[v, u] = True
                        stack.append((v, u))
            out.append(np.array(pixels))
    return out


def read_object(S, label, pixels):
    """One region -> Obj: colour and tint by majority, then the (shape, size, cell, shift) rendered most like it."""
    labels = label[pixels[:, 0], pixels[:, 1]]
    color = list(COLORS)[int(labels[0]) // 2]
    tint = int((labels % 2).mean() > 0.5)
    mask = np.zeros(label.shape, bool)
    mask[pixels[:, 0], pixels[:, 1]] = True
    # the centre from the centroid, and from the bounding box's sides inside the image (an object at the border
    # is clipped: its centroid moves inwards)
    centroid = (pixels.mean(0) + 0.5) / S  # (y, x) as fractions of the side; pixel centres at +0.5
    lo, hi = pixels.min(0) / S, (pixels.max(0) + 1) / S
    best, best_iou = None, -1.0
    for shape in SHAPES:
        for size, r in SIZES.items():
            # extents from the centre (up, down), (left, right) as world.render draws the shape
            ext = {"circle": ((r, r), (r, r)), "square": ((.9 * r, .9 * r), (.9 * r, .9 * r)),
                   "triangle": ((r, .85 * r), (r, r))}[shape]
            drop = TRIANGLE_DROP * r if shape == "triangle" else 0.0
            boxed = [hi[k] - ext[k][1] if lo[k] <= 0 < 1 - hi[k] else lo[k] + ext[k][0] if hi[k] >= 1 > lo[k]
                     else (lo[k] + ext[k][0] + hi[k] - ext[k][1]) / 2 for k in (0, 1)]
            for cy, cx in ((centroid[0] - drop, centroid[1]), boxed):
                place = []
                for c in (cx, cy):
                    cell = int(np.abs(np.array(CELL_CENTRES) - c).argmin())
                    off = c - CELL_CENTRES[cell]
                    place += [cell, float(np.sign(off) * NUDGE) if abs(off) > NUDGE / 2 else 0.0]
                o = Obj(0, shape, color, size, place[0], place[2], place[1], place[3], tint)
                m = object_mask(Scene("white", [o]), 0, S)
                iou = (m & mask).sum() / (m | mask).sum()
                if iou > best_iou:
                    best, best_iou = o, iou
    return best


def match_ids(seen, *refs):
    """`seen` with each object given the id of the object of `refs` it is (a judge pairs the objects of two images
    by what they look like, not by reading order): greedily by likeness, colour 2 + shape 2 + same cell 1. An object
    like none (likeness < 2) is new: ids 100, 101, ... (as the world's "different" editor's objects)."""
    known = [o for ref in refs for o in ref.objects]
    like = lambda p, o: 2 * (p.color == o.color) + 2 * (p.shape == o.shape) + ((p.col, p.row) == (o.col, o.row))
    pairs = sorted((-like(p, o), i, j) for i, p in enumerate(seen.objects) for j, o in enumerate(known))
    ids = {}
    for minus, i, j in pairs:
        if -minus >= 2 and i not in ids and known[j].id not in ids.values():
            ids[i] = known[j].id
    out = copy.deepcopy(seen)
    new = iter(range(100, 1000))
    for i, o in enumerate(out.objects):
        o.id = ids[i] if i in ids else next(new)
    out.objects.sort(key=lambda o: o.id)
    return out
