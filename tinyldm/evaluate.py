"""Evaluate: read the attributes back out of Shapes images, score captions, measure reconstructions,
and the protocol of `python -m tinyldm evaluate` that runs them all (at the end of this file).

Every attribute of a Shapes image (shape, colour, size, position) is a simple geometric fact, so
`detect` measures it with arithmetic on the pixels, and a generated image can be checked against
the prompt that asked for it.

Why an analytic detector and not a trained classifier?
  exact        the constants below are derived from data.py's signed distance functions, and the
               detector scores >= 99 % per attribute on rendered images at 32 and 64 px;
  no training  nothing to fit, nothing to download, nothing that drifts between runs;
  transparent  a student can follow every number: coverage -> blobs -> area, box, centroid;
  unfoolable   a network trained on the same renderer can latch onto texture or artefacts that a
               generator also learns, and then "recognise" a blurry blob as a circle. Here a circle
               is only a circle if its area fills pi/4 of its box.

The detector, per image:
  1. coverage   each pixel p is a blend bg + alpha (c - bg) of the background and some palette
                colour c: pick the c whose segment bg->c passes nearest to p, alpha = the blend
                weight (a least-squares projection), then let the 3x3 neighbourhood vote on c
  2. blobs      connected components of same-colour foreground pixels (8-neighbours), by label
                propagation along pixel links; specks below a minimum area are dropped
  3. features   alpha is divided by the blob's peak (a dim object is still a whole object);
                area = sum of alpha; then edges are steepened (alpha' = clamp(2 alpha - 0.5),
                which undoes some blur) and box width = sum over columns of the column's max
                alpha' (exact for anti-aliased edges), height likewise; position = box centre;
                fill = sum alpha' / (width * height); asymmetry = (centroid y - box y) / height
  4. decide     triangle: mass sits low in its box (asymmetry ~ 1/6, the others 0);
                then fill: cross ~ 0.58 < circle pi/4 ~ 0.79 < square 1;
                size: area against the per-shape area at the geometric mean of the two radii
"""

import itertools
import json
import math
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F

from .data import (ATTRIBUTES, BACKGROUND, COLOUR_NAMES, COLOURS, POSITIONS, RELATIONS, SHAPES, SIZE_RADIUS,
                   SIZES, ShapesConfig, ShapesDataset, describe, render, sample_scenes, to_float)


# ----------------------------------------------------------------------------------------------
# The detector's constants, derived from data.py's geometry (r = object radius, SIZE_RADIUS * H)

# shape areas in units of r^2 (same order as SHAPES): circle pi r^2; square of half side 0.85 r;
# equilateral triangle of circumradius 1.15 r (side 1.15 sqrt(3) r); cross of two 2r x 0.7r bars
SHAPE_AREA = (math.pi, (2 * 0.85) ** 2, math.sqrt(3) / 4 * (1.15 * math.sqrt(3)) ** 2,
              2 * (2 * 0.7) - 0.7 ** 2)
SIZE_SPLIT_R2 = SIZE_RADIUS[0] * SIZE_RADIUS[1]  # r^2 halfway (geometrically) from small to large
FOREGROUND_ALPHA = 0.25    # a pixel belongs to an object when at least this much of it is covered
MIN_PEAK = 0.5             # an object is at least half opaque somewhere (fainter blobs are ghosts)
MIN_AREA = 0.3 * min(SHAPE_AREA) * SIZE_RADIUS[0] ** 2  # blobs below this share of H^2 are specks
SHARPEN = 2.0              # edge steepening before shape features (keeps them stable under blur)
TRIANGLE_ASYMMETRY = 0.05  # centroid below box centre (share of height): triangle 1/6, others 0
FILL_CROSS_CIRCLE = 0.70   # area / box area: cross 2.31/4 = 0.58 below, circle pi/4 = 0.79 above
FILL_CIRCLE_SQUARE = 0.87  # circle 0.79 below, square 1.0 above


def _to_255(images):
    """uint8 [0, 255] or float [-1, 1] images (N, 3, H, W) -> float [0, 255], checked."""
    if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images as a tensor (N, 3, H, W), got "
                         f"{tuple(images.shape) if torch.is_tensor(images) else type(images).__name__}")
    N, C, H, W = images.shape
    if H != W or H < 16:
        raise ValueError(f"expected square images with H = W >= 16, got H={H}, W={W}")
    if images.dtype == torch.uint8:
        return images.float()
    if not images.is_floating_point():
        raise ValueError(f"expected uint8 or float images, got dtype {images.dtype}")
    return (images.float().clamp(-1, 1) + 1) * 127.5


def _box3(x):
    """Sum over each pixel's 3x3 neighbourhood (zero padded), as two 1-D passes."""
    p = F.pad(x, (1, 1, 1, 1))
    rows = p[..., :-2] + p[..., 1:-1] + p[..., 2:]
    return rows[..., :-2, :] + rows[..., 1:-1, :] + rows[..., 2:, :]


def _coverage(x):
    """Per pixel (N, H, W): the palette colour it shows (index into COLOUR_NAMES) and alpha."""
    K = len(COLOURS)
    bg = torch.tensor(BACKGROUND, dtype=x.dtype, device=x.device)                     # (3,)
    v = torch.tensor(list(COLOURS.values()), dtype=x.dtype, device=x.device) - bg    # (K, 3)
    d = x - bg.view(1, 3, 1, 1)                                                       # (N, 3, H, W)
    dv = torch.einsum("nchw,kc->nkhw", d, v)                                          # (N, K, H, W)
    vv = (v * v).sum(1).view(1, K, 1, 1)
    t = (dv / vv).clamp(0, 1)                       # p ~ bg + t (c - bg): least-squares t per colour
    dist2 = (d * d).sum(1, keepdim=True) - 2 * t * dv + t * t * vv   # |d - t v|^2 (N, K, H, W)
    colour = dist2.argmin(1)                                                          # (N, H, W)
    alpha = t.gather(1, colour[:, None])                                              # (N, 1, H, W)
    votes = _box3(F.one_hot(colour, K).permute(0, 3, 1, 2) * alpha)  # alpha-weighted 3x3 votes
    colour = votes.argmax(1)                                                          # (N, H, W)
    return colour, t.gather(1, colour[:, None])[:, 0]


def _components(colour, fg):
    """Connected components of same-colour foreground pixels (8-neighbourhood).

    Every foreground pixel starts with its own label (its index); each round, a pixel takes the
    largest label among its linked neighbours, the pixel its label names takes it too ("hooking"),
    and every label jumps to the label of the pixel it names (pointer jumping). At the fixed point
    all pixels of a component share one label, the index of its last pixel (its "root"). Work grows
    with the number of foreground pixels and the rounds with log(blob diameter), unlike max-pooling
    the whole image once per pixel of diameter.
    Returns the blob id (0..C-1) of each foreground pixel, in the order of fg.nonzero(), and C.
    """
    N, H, W = fg.shape
    pixel = fg.flatten().nonzero()[:, 0]                      # (P,) flat index n*H*W + y*W + x
    P = len(pixel)
    index = torch.full((N * H * W,), -1, dtype=torch.long, device=fg.device)
    index[pixel] = torch.arange(P, device=fg.device)          # flat index -> foreground index
    row, col, colour = (pixel // W) % H, pixel % W, colour.flatten()[pixel]
    src, dst = [], []
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):  # right, down, down-right, down-left
        inside = (row + dy < H) & (col + dx >= 0) & (col + dx < W)
        other = index[(pixel + dy * W + dx).clamp(max=N * H * W - 1)]
        link = inside & (other >= 0) & (colour[other.clamp(min=0)] == colour)
        src.append(torch.arange(P, device=fg.device)[link])
        dst.append(other[link])
    src, dst = torch.cat(src + dst), torch.cat(dst + src)  # links go both ways
    label = torch.arange(P, device=fg.device)
    while True:
        new = label.scatter_reduce(0, dst, label[src], "amax")        # take a neighbour's label
        new = new.scatter_reduce(0, label[dst], label[src], "amax")   # hook: so does its root
        new = new[new]                                                # pointer jumping
        if torch.equal(new, label):
            break
        label = new
    is_root = label == torch.arange(P, device=fg.device)
    return (torch.cumsum(is_root, 0) - 1)[label], int(is_root.sum())


def _detect_chunk(x):
    """Detections for one chunk of float [0, 255] images (N, 3, H, W)."""
    N, _, H, W = x.shape
    colour, alpha = _coverage(x)
    fg = alpha > FOREGROUND_ALPHA                                                     # (N, H, W)
    n, row, col = fg.nonzero().unbind(1)                                              # (P,) each
    blob, C = _components(colour, fg)                                                 # (P,), int
    a = alpha[fg]                                                                     # (P,)
    sums = lambda w: torch.zeros(C, device=x.device).index_add_(0, blob, w)  # noqa: E731
    peak = torch.zeros(C, device=x.device).scatter_reduce_(0, blob, a, "amax")       # (C,)
    a = a / peak[blob]                           # coverage relative to the blob's full colour
    area = sums(a)                                                                    # (C,) pixels
    a = ((a - 0.5) * SHARPEN + 0.5).clamp(0, 1)  # steeper edges: undo some blur before measuring
    centroid_y = sums(a * (row + 0.5)) / sums(a)
    col_max = torch.zeros(C * W, device=x.device).scatter_reduce_(0, blob * W + col, a, "amax")
    row_max = torch.zeros(C * H, device=x.device).scatter_reduce_(0, blob * H + row, a, "amax")
    col_max, row_max = col_max.view(C, W), row_max.view(C, H)                        # (C, W), (C, H)
    centres = torch.arange(W, device=x.device) + 0.5
    width, height = col_max.sum(1), row_max.sum(1)                                   # (C,) pixels
    box_x, box_y = (col_max * centres).sum(1) / width, (row_max * centres).sum(1) / height
    fill = sums(a) / (width * height)
    asymmetry = (centroid_y - box_y) / height
    image = torch.zeros(C, dtype=torch.long, device=x.device).index_put_((blob,), n)  # any pixel's
    blob_colour = torch.zeros_like(image).index_put_((blob,), colour[fg])            # (all agree)
    shape = torch.where(asymmetry > TRIANGLE_ASYMMETRY, 2,
                        torch.where(fill < FILL_CROSS_CIRCLE, 3,
                                    torch.where(fill < FILL_CIRCLE_SQUARE, 0, 1)))
    rel_area = area / (H * W)                                  # scale free: share of the image
    shape_area = torch.tensor(SHAPE_AREA, device=x.device)[shape]
    large = rel_area > shape_area * SIZE_SPLIT_R2
    cx, cy = box_x / W, box_y / H
    cell = 3 * (cy * 3).long().clamp(0, 2) + (cx * 3).long().clamp(0, 2)
    columns = [t.tolist() for t in (image, shape, blob_colour, large, cell, cx, cy, rel_area, fill,
                                    asymmetry, peak)]
    out = [[] for _ in range(N)]
    for i, s, c, big, k, bx, by, ar, fi, asy, pk in zip(*columns):
        if ar >= MIN_AREA and pk >= MIN_PEAK:
            out[i].append({"shape": SHAPES[s], "colour": COLOUR_NAMES[c], "size": SIZES[int(big)],
                           "position": POSITIONS[k], "cx": bx, "cy": by, "area": ar,
                           "fill": fi, "asymmetry": asy})
    return [sorted(objs, key=lambda o: -o["area"])[:2] for objs in out]


def detect(images, chunk=256):
    """The objects in each image: a list (one per image) of up to 2 dicts, largest first, with
    "shape", "colour", "size", "position" (names from data.py), the box centre "cx", "cy" and
    "area" as fractions of the image, and the shape features "fill" and "asymmetry".

    images: uint8 (N, 3, H, W) in [0, 255] or float in [-1, 1], H = W >= 16, on any device.
    Rendered images are read >= 99 % right per attribute from 32 px up; below that small shapes
    blur together (shape right 97 % at 24 px, 86 % at 16 px). Two touching objects of one colour
    merge into one blob (about 1 two-object image in 500 at 32 px).
    """
    with torch.no_grad():
        x = _to_255(images)
        return [obj for s in range(0, len(x), chunk) for obj in _detect_chunk(x[s:s + chunk])]


def detector_accuracy(detections, attributes):
    """Per-attribute accuracy of detections against ground truth (`ShapesDataset.attributes(i)`).

    Each true object is matched to the detection whose centre is nearest (the best assignment of
    the image's detections); an object with no detection counts as wrong on every attribute.
    "count": share of images with as many detections as objects; "all": every attribute of every
    object right and the count right.
    """
    def distance(o, d):
        return 1.0 if d is None else math.hypot(d["cx"] - o["cx"], d["cy"] - o["cy"])

    correct, objects, count_ok, all_ok = defaultdict(int), 0, 0, 0
    for dets, truth in zip(detections, attributes, strict=True):
        gt = truth["objects"]
        best = min(itertools.permutations(list(dets) + [None] * len(gt), len(gt)),
                   key=lambda assigned: sum(distance(o, d) for o, d in zip(gt, assigned)))
        right = [(a, d is not None and d[a] == o[a]) for o, d in zip(gt, best) for a in ATTRIBUTES]
        for a, ok in right:
            correct[a] += ok
        objects += len(gt)
        count_ok += len(dets) == len(gt)
        all_ok += all(ok for _, ok in right) and len(dets) == len(gt)
    n = max(len(attributes), 1)
    return {**{a: correct[a] / max(objects, 1) for a in ATTRIBUTES},
            "count": count_ok / n, "all": all_ok / n, "n_images": len(attributes), "n_objects": objects}


# ----------------------------------------------------------------------------------------------
# Caption fidelity: prompts with known intent, and a score for each generated image
#
# A target is {"kind": "single" | "two" | "held_out" | ..., "objects": [one dict per object with only
# the attributes the prompt mentions], "relation": None or a name from RELATIONS (object 0 to 1)}.

PROMPT_KINDS = ("single", "two", "held_out")
MENTION_P = 0.5  # probability that a "single" prompt mentions colour, size, position (each)


def prompt_set(kind, n, seed=0, held_out=ShapesConfig().held_out):
    """n (prompt, target) pairs of one kind, the same for the same seed.

    "single"    one object; shape always, colour/size/position each with probability MENTION_P;
                a mentioned (colour, shape) is never a held-out pair
    "two"       "a red circle left of a blue square": two different (colour, shape) objects
                (no held-out pair) and a relation
    "held_out"  one object whose (colour, shape) is a held-out pair; size/position as "single"
    """
    if kind not in PROMPT_KINDS:
        raise ValueError(f"kind must be one of {PROMPT_KINDS}, got {kind!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    held_out = {tuple(pair) for pair in held_out}
    allowed = [(c, s) for c in COLOUR_NAMES for s in SHAPES if (c, s) not in held_out]
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        if kind == "two":
            (c0, s0), (c1, s1) = (allowed[i] for i in rng.choice(len(allowed), 2, replace=False))
            relation = RELATIONS[rng.integers(len(RELATIONS))]
            prompt = f"{describe(s0, c0)} {relation} {describe(s1, c1)}"
            objects = [{"shape": s0, "colour": c0}, {"shape": s1, "colour": c1}]
            pairs.append((prompt, {"kind": kind, "objects": objects, "relation": relation}))
            continue
        pool = sorted(held_out) if kind == "held_out" else allowed
        colour, shape = pool[rng.integers(len(pool))]
        say_colour, say_size, say_position = rng.random(3) < MENTION_P
        if kind == "single" and not say_colour:
            colour = None
        size = SIZES[rng.integers(len(SIZES))] if say_size else None
        position = POSITIONS[rng.integers(len(POSITIONS))] if say_position else None
        obj = {"shape": shape, "colour": colour, "size": size, "position": position}
        obj = {a: v for a, v in obj.items() if v is not None}
        pairs.append((describe(shape, colour, size, position),
                      {"kind": kind, "objects": [obj], "relation": None}))
    return pairs


def targets_from_attributes(attributes):
    """Targets from ground truth (`ShapesDataset.attributes(i)`): what each caption mentions.
    Scoring real images against these gives the ceiling a generator can reach."""
    targets = []
    for truth in attributes:
        objects = [{a: obj[a] for a in ATTRIBUTES if said[a]}
                   for obj, said in zip(truth["objects"], truth["mentions"], strict=True)]
        targets.append({"kind": "single" if len(objects) == 1 else "two", "objects": objects,
                        "relation": truth["relation"]})
    return targets


RELATION_HOLDS = {  # does detection a stand in the relation to detection b? (box centres, y down)
    "left of": lambda a, b: a["cx"] < b["cx"], "right of": lambda a, b: a["cx"] > b["cx"],
    "above": lambda a, b: a["cy"] < b["cy"], "below": lambda a, b: a["cy"] > b["cy"]}
assert set(RELATION_HOLDS) == set(RELATIONS)


def score(detections, targets):
    """Per image, a dict: each mentioned attribute -> right or not ("relation" too, when there is
    one), "all_correct", and "count" (as many objects detected as intended; not in all_correct).

    One object: the largest detection is judged. Two objects: detections are assigned to the
    target objects in the way that gets the most checks right; an attribute is right when it is
    right for every object that mentions it, and the relation only when it holds between two
    detections that match everything said about their objects ("a circle left of a circle" is
    right when some circle is left of another).
    """
    results = []
    for dets, target in zip(detections, targets, strict=True):
        objects, relation = target["objects"], target.get("relation")
        if relation is not None and relation not in RELATION_HOLDS:
            raise ValueError(f"relation must be one of {RELATIONS} or None, got {relation!r}")
        best = None
        for assigned in itertools.permutations(list(dets[:len(objects)]) + [None] * len(objects),
                                               len(objects)):
            checks, found = defaultdict(lambda: True), True
            for want, got in zip(objects, assigned):
                for a, value in want.items():
                    checks[a] &= got is not None and got[a] == value
                    found &= got is not None and got[a] == value
            if relation is not None:  # only between the objects the prompt describes
                checks["relation"] = found and RELATION_HOLDS[relation](*assigned[:2])
            if best is None or sum(checks.values()) > sum(best.values()):
                best = checks
        result = dict(best)
        result["all_correct"] = all(best.values())
        result["count"] = len(dets) == len(objects)
        results.append(result)
    return results


def wilson_interval(k, n, z=1.96):
    """The Wilson score interval (lo, hi) for a share k / n; z = 1.96 gives 95 % (Wilson 1927).

    Unlike p̂ ± z·√(p̂(1−p̂)/n) it stays inside [0, 1] and keeps a width at 0/n and n/n (0 of 10
    right: (0, 0.278), not (0, 0)). It assumes n independent trials. n = 0 gives (0.0, 1.0): no
    images, every share possible.
    """
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    # Wilson 1927: (p̂ + z²/2n ± z·√(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n)
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    lo, hi = (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)
    return min(max(lo, 0.0), p), max(min(hi, 1.0), p)  # clamped against rounding: lo <= p̂ <= hi


def _summarise(scores):
    """Per key, over the images where it was checked: the share right (key), its 95 % Wilson
    interval (key + "_ci", [lo, hi]) and the number of those images (key + "_n"); "n": all images."""
    summary = {"n": len(scores)}
    for key in ATTRIBUTES + ("relation", "all_correct", "count"):
        values = [s[key] for s in scores if key in s]
        if values:
            k, n = sum(values), len(values)
            summary.update({key: k / n, key + "_ci": list(wilson_interval(k, n)), key + "_n": n})
    return summary


def fidelity(images, targets):
    """Caption fidelity of images against targets: {"n", "all_correct" (share of images with every
    mentioned attribute right), one accuracy per mentioned attribute, "relation", "count"}, each
    share K with its 95 % Wilson interval K_ci and the number of images K_n it was checked on."""
    if len(images) != len(targets):
        raise ValueError(f"expected one target per image, got {len(images)} images, "
                         f"{len(targets)} targets")
    return _summarise(score(detect(images), targets))


def diversity(detections, targets):
    """Does the model vary what the prompt leaves open, or collapse to one mode?

    Images whose targets are equal (one object) form a group (the N images of one prompt). For
    each attribute the prompt leaves open (position, size): distinct = number of distinct detected
    values / min(N, number of values), entropy = entropy of the detected values / log min(N, K).
    Both are 1 for a model that spreads out as far as N allows, near 0 for mode collapse;
    "uniform" is the mean `distinct` that N independent uniform draws would give (the data's value).
    """
    groups = defaultdict(list)
    for dets, target in zip(detections, targets, strict=True):
        if len(target["objects"]) == 1:
            groups[json.dumps(target, sort_keys=True)].append(dets[0] if dets else None)
    report = {}
    for attribute, values in (("position", POSITIONS), ("size", SIZES)):
        K, distinct, entropy, uniform = len(values), [], [], []
        for key, dets in groups.items():
            if attribute in json.loads(key)["objects"][0] or len(dets) < 2:
                continue
            found = [d[attribute] for d in dets if d is not None]
            top = min(len(dets), K)
            p = np.array([found.count(v) for v in values if v in found]) / max(len(found), 1)
            distinct.append(len(p) / top)
            entropy.append(float(-(p * np.log(p)).sum() / math.log(top)))
            uniform.append(K * (1 - (1 - 1 / K) ** len(dets)) / top)  # E[#distinct] of N draws
        report[attribute] = {"prompts": len(distinct),
                             "distinct": float(np.mean(distinct)) if distinct else None,
                             "entropy": float(np.mean(entropy)) if entropy else None,
                             "uniform": float(np.mean(uniform)) if uniform else None}
    return report


def evaluate_model(model, prompts_and_targets, images_per_prompt=4, steps=50, guidance_scale=3.0,
                   sampler="ddim", generator=None, batch_size=64, classifier_scale=0.0, use_prompts=True,
                   classifier=None):
    """Generate images_per_prompt images for each (prompt, target), detect, and score them.

    Calls model.generate(prompts, steps=, guidance_scale=, sampler=, generator=) -> images in
    [-1, 1]. classifier_scale != 0 adds classifier guidance by `classifier` (a classifier.LatentClassifier)
    towards each target (single-object targets); use_prompts=False samples the unconditional model
    (empty prompts), so that classifier guidance can be judged alone. Returns {"fidelity": {kind: summary, ..., "all":
    summary}, "diversity": ...}.
    """
    from .classifier import classifier_targets, make_classifier_grad

    if images_per_prompt < 1 or batch_size < 1:
        raise ValueError(f"images_per_prompt and batch_size must be >= 1, "
                         f"got {images_per_prompt} and {batch_size}")
    if classifier_scale and classifier is None:
        raise ValueError("classifier_scale != 0 needs a classifier")
    prompts = [p if use_prompts else "" for p, _ in prompts_and_targets for _ in range(images_per_prompt)]
    targets = [t for _, t in prompts_and_targets for _ in range(images_per_prompt)]
    detections = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            batch = slice(start, start + batch_size)
            guide = dict(classifier_scale=classifier_scale, classifier_grad=make_classifier_grad(
                classifier, classifier_targets(targets[batch]))) if classifier_scale else {}
            images = model.generate(prompts[batch], steps=steps, guidance_scale=guidance_scale,
                                    sampler=sampler, generator=generator, **guide)
            detections += detect(images)
    scores = score(detections, targets)
    by_kind = defaultdict(list)
    for s, t in zip(scores, targets):
        by_kind[t["kind"]].append(s)
    summary = {kind: _summarise(s) for kind, s in by_kind.items()}
    summary["all"] = _summarise(scores)
    return {"fidelity": summary, "diversity": diversity(detections, targets),
            "images_per_prompt": images_per_prompt, "steps": steps, "guidance_scale": guidance_scale,
            "sampler": sampler, "classifier_scale": classifier_scale, "use_prompts": use_prompts}


# ----------------------------------------------------------------------------------------------
# The same-noise test: does the prompt place the object, or the starting noise?

def position_follows_prompt(model, noises=12, steps=50, guidance_scale=3.0, generator=None, batch_size=64):
    """Hold the starting noise x_T fixed, change only the prompted position, and see where the object goes.

    For each of `noises` starting noises x_T ~ N(0, I) (1, z, h, w), one large object (its (colour,
    shape) cycling through the pairs that are not held out) is asked for at each of the 9 POSITIONS,
    all 9 images from that one x_T with DDIM, η = 0 (so an image depends on x_T and the prompt only).
    The largest detected object's cell is compared with
      the prompted cell:  "hit", the share of images with the object where the prompt asked;
      the noise's cell:   the most common cell among that noise's 9 images (ties: the first prompt's);
                          "follows_noise", the share of images with the object in it, and
                          "moved", the share with the object elsewhere: the prompt moved it.
    follows_noise + moved + the share with no object = 1; "chance" = 1/9 is the hit rate of a model
    that ignores the prompt. A model that reads position from the noise: follows_noise ≈ 1, moved ≈ 0,
    hit ≈ 1/9. A model that follows the prompt: hit ≈ 1, moved ≈ 8/9, follows_noise ≈ 1/9.
    Each share K has its 95 % Wilson interval K_ci over "n" images; the 9 images of one noise are
    not independent, so read the intervals as the least uncertainty there is.

    model: image_size, autoencoder_cfg.downsample_factor, unet_cfg.in_channels and
    generate(prompts, steps=, guidance_scale=, sampler=, eta=, generator=, x_T=) -> images in [-1, 1].
    The noise is drawn from `generator`, on its device (CPU without one).
    """
    if noises < 1 or batch_size < 1:
        raise ValueError(f"noises and batch_size must be >= 1, got {noises} and {batch_size}")
    held_out = {tuple(pair) for pair in ShapesConfig().held_out}
    pairs = [(c, s) for c in COLOUR_NAMES for s in SHAPES if (c, s) not in held_out]
    prompts = [describe(shape, colour, "large", position)
               for colour, shape in (pairs[i % len(pairs)] for i in range(noises)) for position in POSITIONS]
    h = model.image_size // model.autoencoder_cfg.downsample_factor
    x_T = torch.randn((noises, model.unet_cfg.in_channels, h, h), generator=generator,
                      device=generator.device if generator is not None else "cpu")   # (noises, z, h, w)
    x_T = x_T.repeat_interleave(len(POSITIONS), 0)                   # (noises·9, z, h, w), 9 per noise
    detections = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            batch = slice(start, start + batch_size)
            images = model.generate(prompts[batch], steps=steps, guidance_scale=guidance_scale, sampler="ddim",
                                    eta=0.0, generator=generator, x_T=x_T[batch])
            detections += detect(images)
    cells = [d[0]["position"] if d else None for d in detections]    # largest object's cell, or None
    hit = follows = moved = 0
    for i in range(0, len(cells), len(POSITIONS)):
        seen = cells[i:i + len(POSITIONS)]                             # one noise, prompts in POSITIONS order
        found = [c for c in seen if c is not None]
        modal = max(found, key=found.count) if found else None        # max keeps the first of a tie
        hit += sum(c == p for c, p in zip(seen, POSITIONS))
        follows += sum(c is not None and c == modal for c in seen)
        moved += sum(c is not None and c != modal for c in seen)
    n = len(cells)
    report = {"n": n, "noises": noises, "chance": 1 / len(POSITIONS), "steps": steps,
              "guidance_scale": guidance_scale}
    for key, k in (("hit", hit), ("follows_noise", follows), ("moved", moved)):
        report.update({key: k / n, key + "_ci": list(wilson_interval(k, n))})
    return report


# ----------------------------------------------------------------------------------------------
# Reconstruction: how much does the autoencoder lose?

def psnr(x, y, reduce=True, max_db=100.0):
    """Peak signal-to-noise ratio in dB of images in [-1, 1], measured on the [0, 1] range:
    PSNR = 10 log10(1 / MSE), MSE over C, H, W of (x - y) / 2, per image; then the mean over images
    (reduce=False: the (B,) values). Identical images give max_db, not infinity."""
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"expected two image batches (B, C, H, W) of one shape, "
                         f"got {tuple(x.shape)} and {tuple(y.shape)}")
    mse = (((x.float() - y.float()) / 2) ** 2).mean(dim=(1, 2, 3))                      # (B,)
    db = (10 * torch.log10(1 / mse)).clamp(max=max_db)   # PSNR = 10 log10(peak^2 / MSE), peak = 1
    return db.mean().item() if reduce else db


def reconstruction_report(autoencoder, dataset, n=None, batch_size=64):
    """PSNR of x_hat = decode(encode(x).mode()) on the first n images of a ShapesDataset, and
    the detector's accuracy on the reconstructions next to its accuracy on the originals: the
    attributes the autoencoder keeps are the ones a latent diffusion model can get right."""
    images = dataset.images_uint8()[:n]
    attributes = [dataset.attributes(i) for i in range(len(images))]
    device = next(autoencoder.parameters()).device
    was_training = autoencoder.training
    autoencoder.eval()
    values, det_x, det_x_hat = [], [], []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = to_float(images[start:start + batch_size]).to(device)                   # (B, 3, H, W)
            x_hat = autoencoder.decode(autoencoder.encode(x).mode()).float().clamp(-1, 1)
            values.append(psnr(x, x_hat, reduce=False).cpu())
            det_x += detect(x)
            det_x_hat += detect(x_hat)
    autoencoder.train(was_training)
    return {"n": len(images), "psnr": torch.cat(values).mean().item(),
            "detector_originals": detector_accuracy(det_x, attributes),
            "detector_reconstructions": detector_accuracy(det_x_hat, attributes)}


# ----------------------------------------------------------------------------------------------
# The protocol of `python -m tinyldm evaluate`: six measurements, in the order it runs them
#   1. reconstruction     what the autoencoder keeps: PSNR, and the detector on reconstructions
#   2. guidance_sweep     fidelity at each classifier-free guidance scale s (DDIM); the best s is
#                         the one with the most single-object images all right
#   3. final_fidelity     the headline figures: fresh prompts at the best s, one image each
#   4. same_noise_test    does the prompt move the object when x_T is held fixed?
#   5. sampler_sweep      DDIM with few steps against DDPM with all T, at the best s
#   6. classifier_sweep   classifier guidance γ alone and on top of CFG, against CFG alone
#   7. edit_tests         (only with --edits N) recolouring by image-to-image and by inpainting
# Each prints one line per run and returns what eval.json stores. Every run draws its noise from a
# fresh generator seeded with `seed`, so two settings differ only in the setting, not in the noise.

def _seeded(model, seed):
    """A generator on the model's device, seeded: each run starts from the same noise."""
    return torch.Generator(model.device).manual_seed(seed)


def _share(summary, key="all_correct"):
    """'0.912 [0.893, 0.928]': a share from a summary and its 95 % Wilson interval (key + "_ci")."""
    lo, hi = summary[key + "_ci"]
    return f"{summary[key]:.3f} [{lo:.3f}, {hi:.3f}]"


def _print_run(result):
    """One line per run of evaluate_model: sampler, steps, scale, and the all-correct share per kind."""
    f = result["fidelity"]
    print(f"{result['sampler']}-{result['steps']:<5} guidance {result['guidance_scale']:<4g} all-correct: "
          + "  ".join(f"{kind} {_share(f[kind])}" for kind in PROMPT_KINDS if kind in f))


def reconstruction(model, n_images):
    """1. reconstruction_report of the model's autoencoder on the first n_images validation images."""
    val = ShapesDataset(ShapesConfig(image_size=model.image_size, num_val=n_images), "val")
    report = reconstruction_report(model.autoencoder, val)
    print(f"autoencoder: PSNR {report['psnr']:.2f} dB on {len(val)} validation images; detector "
          f"{report['detector_originals']['all']:.3f} on originals, "
          f"{report['detector_reconstructions']['all']:.3f} on reconstructions")
    return report


def guidance_sweep(model, pairs, scales, images_per_prompt=4, steps=50, seed=0, batch_size=64):
    """2. evaluate_model at each guidance scale s in `scales` (DDIM, `steps` steps): a list, in order."""
    print(f"{'sampler':<11}{'':14}(share of images with every mentioned attribute right [95 % Wilson interval])")
    results = []
    for s in scales:
        results.append(evaluate_model(model, pairs, images_per_prompt, steps=steps, guidance_scale=s, sampler="ddim",
                                      generator=_seeded(model, seed), batch_size=batch_size))
        _print_run(results[-1])
    return results


def best_guidance_scale(sweep):
    """The scale of a guidance sweep with the highest single-object all-correct share (the first of a tie)."""
    return max(sweep, key=lambda r: r["fidelity"]["single"]["all_correct"])["guidance_scale"]


def final_fidelity(model, n, guidance_scale, steps=50, seed=0, batch_size=64):
    """3. The headline figures: n fresh prompts of each kind (drawn with seed + 1, so the guidance scale
    was not picked on them), one image each, so that the images are independent draws and the Wilson
    intervals hold. Prints every attribute's share per kind."""
    pairs = [pt for kind in PROMPT_KINDS for pt in prompt_set(kind, n, seed=seed + 1)]
    result = evaluate_model(model, pairs, 1, steps=steps, guidance_scale=guidance_scale, sampler="ddim",
                            generator=_seeded(model, seed), batch_size=batch_size)
    _print_run(result)
    for kind in PROMPT_KINDS:
        f = result["fidelity"][kind]
        said = ("colour", "shape", "size", "position", "relation")  # in the order a caption says them
        print(f"  {kind:<9} n {f['n']}: all-correct {_share(f)}  " + "  ".join(f"{a} {_share(f, a)}" for a in said if a in f))
    return result


def same_noise_test(model, noises, guidance_scale, steps=50, seed=0, batch_size=64):
    """4. position_follows_prompt with `noises` starting noises x_T, from a generator seeded with `seed`."""
    report = position_follows_prompt(model, noises, steps=steps, guidance_scale=guidance_scale,
                                     generator=_seeded(model, seed), batch_size=batch_size)
    print(f"same noise, 9 positions each ({report['n']} images, s {report['guidance_scale']:g}): object in the "
          f"prompted cell {_share(report, 'hit')} (chance {report['chance']:.3f}), in the noise's usual cell "
          f"{_share(report, 'follows_noise')}, moved by the prompt {_share(report, 'moved')}")
    return report


def parse_sampler(name):
    """A sampler sweep name -> (sampler, steps): "ddimN" -> ("ddim", N), "ddpm" -> ("ddpm", None: all T)."""
    if name == "ddpm":
        return "ddpm", None
    steps = name[4:]
    if name.startswith("ddim") and steps.isascii() and steps.isdigit() and int(steps) >= 1:
        return "ddim", int(steps)
    raise ValueError(f"unknown sampler {name!r}: expected ddimN (N DDIM steps, N >= 1) or ddpm")


def sampler_sweep(model, pairs, samplers, guidance_scale, images_per_prompt=4, seed=0, batch_size=64):
    """5. evaluate_model per sampler name: "ddimN" is DDIM with N steps, "ddpm" is DDPM with all T steps."""
    results = []
    for name in samplers:
        sampler, steps = parse_sampler(name)
        steps = steps or model.diffusion_cfg.T
        results.append(evaluate_model(model, pairs, images_per_prompt, steps=steps, guidance_scale=guidance_scale,
                                      sampler=sampler, generator=_seeded(model, seed), batch_size=batch_size))
        _print_run(results[-1])
    return results


def classifier_sweep(model, classifier, pairs, gammas, guidance_scale, images_per_prompt=4, steps=50, seed=0,
                     batch_size=64):
    """6. Classifier guidance (Guided Eq. 14) by `classifier` (a classifier.LatentClassifier) next to
    classifier-free guidance, with DDIM, on single-object prompts (what the classifier has labels for). Each result carries its "method":
      for each γ in gammas:  "classifier"      empty prompts (the unconditional model), s = 1, the
                                               classifier at γ; at γ = 0 the plain "unconditional" model
                             "cfg+classifier"  the prompts at guidance_scale, plus the classifier at γ
      last:                  "conditional, no guidance"  the prompts at s = 1, no classifier."""
    runs = []  # (method, guidance scale s, classifier scale γ, use the prompts?)
    for gamma in gammas:
        runs.append(("unconditional" if gamma == 0 else "classifier", 1.0, gamma, False))
        runs.append(("cfg+classifier", guidance_scale, gamma, True))
    runs.append(("conditional, no guidance", 1.0, 0.0, True))
    results = []
    for method, s, gamma, use_prompts in runs:
        result = evaluate_model(model, pairs, images_per_prompt, steps=steps, guidance_scale=s, sampler="ddim",
                                generator=_seeded(model, seed), batch_size=batch_size, classifier_scale=gamma,
                                use_prompts=use_prompts, classifier=classifier)
        result["method"] = method
        entropy = result["diversity"]["position"]["entropy"]
        print(f"{method:<26} s {s:<4g} γ {gamma:<5g} all-correct {_share(result['fidelity']['single'])}  "
              "position entropy " + (f"{entropy:.2f}" if entropy is not None else "n/a"))
        results.append(result)
    return results


# ----------------------------------------------------------------------------------------------
# Editing with the same model (run by `evaluate --edits N`, off by default):
#   7a. recolour_test   image-to-image: one object, the same caption in another colour, against strength
#   7b. inpaint_test    inpainting: two objects, one object's box masked and asked in another colour
# The source images are validation scenes whose (colour, shape) pairs are not held out, and no edit
# asks for a held-out pair: these measure editing, not compositional generalisation.

def edit_scenes(image_size, n, n_objects, seed=0):
    """The first n validation scenes with n_objects objects (1 or 2) and no held-out (colour, shape) pair:
    (Scenes, uint8 images (n, 3, H, W))."""
    cfg = ShapesConfig(image_size=image_size, seed=seed, two_object_prob=float(n_objects == 2))
    held_out = set(cfg.held_out)
    keep, start = [], 0
    while len(keep) < n:  # about 1 scene in 6 has a held-out pair: draw on until there are n
        scenes = sample_scenes(cfg, "val", np.arange(start, start + 2 * n))
        keep += [start + i for i in range(len(scenes)) if not any(
            (COLOUR_NAMES[scenes.colour[i, k]], SHAPES[scenes.shape[i, k]]) in held_out for k in range(n_objects))]
        start += 2 * n
    scenes = sample_scenes(cfg, "val", np.array(keep[:n]))
    return scenes, render(scenes, image_size)


def other_colour(scenes, i, k, held_out=ShapesConfig().held_out):
    """A colour for object k of scene i other than its own, cycling with i through the others; never a
    held-out pair with the object's shape."""
    colour, shape = COLOUR_NAMES[scenes.colour[i, k]], SHAPES[scenes.shape[i, k]]
    others = [c for c in COLOUR_NAMES if c != colour and (c, shape) not in {tuple(p) for p in held_out}]
    return others[i % len(others)]


def _object(scenes, i, k, colour=None):
    """Object k of scene i as a dict of its attributes (colour replaced when given) and its centre."""
    return {"shape": SHAPES[scenes.shape[i, k]], "colour": colour or COLOUR_NAMES[scenes.colour[i, k]],
            "size": SIZES[scenes.size[i, k]], "position": POSITIONS[scenes.cell[i, k]],
            "cx": float(scenes.cx[i, k]), "cy": float(scenes.cy[i, k])}


def _say(obj):
    """The full caption of one object: "a large red circle at the top left"."""
    return describe(obj["shape"], obj["colour"], obj["size"], obj["position"])


def _shares(counts, n):
    """{key: k/n, key + "_ci": its 95 % Wilson interval} for each count k of n images."""
    out = {"n": n}
    for key, k in counts.items():
        out.update({key: k / max(n, 1), key + "_ci": list(wilson_interval(k, n))})
    return out


def _nearest(dets, obj, within=1 / 6):
    """The detection whose centre is nearest obj's centre, if within `within` of the image side; else None."""
    dist = [math.hypot(d["cx"] - obj["cx"], d["cy"] - obj["cy"]) for d in dets]
    return dets[int(np.argmin(dist))] if dist and min(dist) < within else None


def recolour_prompt(obj):
    """What recolour_test asks for: the object's shape in its new colour, nothing else ("a blue circle")."""
    return describe(obj["shape"], obj["colour"])


def recolour_test(model, n_images, strengths, steps=50, guidance_scale=3.0, seed=0, batch_size=64):
    """7a. Recolour by image-to-image (SDEdit), against the strength.

    n_images single-object validation images; image i is prompted with its shape in another colour and
    nothing else ("a blue circle": recolour_prompt; the colour from other_colour), and edited with
    model.img2img at each strength s, every s from the same noise (a generator seeded with `seed`). The
    prompt does not say the size or the position, so only the input image can keep them. The largest detected object is judged; per strength,
    each share over the n images with its 95 % Wilson interval:
      "recoloured"  it has the asked colour
      "kept"        it has the original shape, size and position, whatever its colour
      "edited"      exactly one object, recoloured and kept: the edit as asked
      "unchanged"   it still has the original colour (the edit did not take)
    Returns {"n", "steps", "guidance_scale", "by_strength": [one dict per strength, in order]} (JSON-ready).
    """
    scenes, images = edit_scenes(model.image_size, n_images, 1, seed)
    before = [_object(scenes, i, 0) for i in range(n_images)]
    after = [_object(scenes, i, 0, other_colour(scenes, i, 0)) for i in range(n_images)]
    prompts = [recolour_prompt(obj) for obj in after]
    by_strength = []
    for s in strengths:
        generator, detections = _seeded(model, seed), []
        with torch.no_grad():
            for start in range(0, n_images, batch_size):
                batch = slice(start, start + batch_size)
                x = to_float(images[batch]).to(model.device)
                detections += detect(model.img2img(x, prompts[batch], strength=s, steps=steps,
                                                   guidance_scale=guidance_scale, generator=generator))
        counts = dict.fromkeys(("recoloured", "kept", "edited", "unchanged"), 0)
        for dets, old, new in zip(detections, before, after):
            d = dets[0] if dets else None
            recoloured = d is not None and d["colour"] == new["colour"]
            kept = d is not None and all(d[a] == old[a] for a in ("shape", "size", "position"))
            counts["recoloured"] += recoloured
            counts["kept"] += kept
            counts["edited"] += recoloured and kept and len(dets) == 1
            counts["unchanged"] += d is not None and d["colour"] == old["colour"]
        by_strength.append({"strength": s, **_shares(counts, n_images)})
        print(f"img2img recolour, strength {s:<4g} edited {_share(by_strength[-1], 'edited')}  recoloured "
              f"{_share(by_strength[-1], 'recoloured')}  shape/size/position kept {_share(by_strength[-1], 'kept')}")
    return {"n": n_images, "steps": steps, "guidance_scale": guidance_scale, "by_strength": by_strength}


def object_box_mask(scenes, i, k, image_size, margin=1):
    """A (H, W) bool mask over object k of scene i: the square of half side r + margin pixels around its centre
    (r = SIZE_RADIUS · H; no shape of data.py reaches farther than r from its centre, the margin covers the
    anti-aliased edge)."""
    H = image_size
    half = SIZE_RADIUS[scenes.size[i, k]] * H + margin
    cx, cy = scenes.cx[i, k] * H, scenes.cy[i, k] * H
    centres = torch.arange(H) + 0.5                                                  # pixel centres
    inside_x, inside_y = (centres - cx).abs() <= half, (centres - cy).abs() <= half  # (W,), (H,)
    return inside_y[:, None] & inside_x[None, :]                                     # (H, W)


def masked_psnr(x, y, keep, max_db=100.0):
    """PSNR in dB (as psnr) of images x, y (B, 3, H, W) in [-1, 1] over the pixels where keep (B, H, W) is True:
    (B,) values."""
    se = (((x.float() - y.float()) / 2) ** 2).sum(1)                                 # (B, H, W)
    mse = (se * keep).sum((1, 2)) / (3 * keep.sum((1, 2)).clamp(min=1))              # (B,)
    return (10 * torch.log10(1 / mse)).clamp(max=max_db)                             # PSNR = 10 log10(1 / MSE)


def inpaint_test(model, n_images, steps=50, guidance_scale=3.0, resample=1, seed=0, batch_size=64):
    """7b. Recolour one object of two by inpainting (RePaint).

    n_images two-object validation scenes; in scene i object k = i mod 2 is masked (object_box_mask) and the
    prompt names both objects with every attribute ("a large red circle at the top left and a small blue
    square at the bottom"), object k in another colour (other_colour). Returns (JSON-ready):
      "psnr_outside"                 mean PSNR (dB) outside the masks, result against the input
      "psnr_outside_reconstruction"  the same for the autoencoder's reconstruction D(E(x)): the ceiling, since
                                     inpainting keeps the latents outside the mask, not the pixels
      shares with 95 % Wilson intervals, judging the detection nearest each object's centre:
      "recoloured"  the masked object has the asked colour and its own shape
      "other_kept"  the other object has all its attributes
      "edited"      both
    """
    scenes, images = edit_scenes(model.image_size, n_images, 2, seed)
    masked = [i % 2 for i in range(n_images)]
    asked = [_object(scenes, i, k, other_colour(scenes, i, k)) for i, k in enumerate(masked)]
    other = [_object(scenes, i, 1 - k) for i, k in enumerate(masked)]
    objects = [(a, o) if k == 0 else (o, a) for a, o, k in zip(asked, other, masked)]  # in the scene's order
    prompts = [f"{_say(first)} and {_say(second)}" for first, second in objects]
    masks = torch.stack([object_box_mask(scenes, i, k, model.image_size) for i, k in enumerate(masked)])  # (n, H, W)
    generator, detections, psnr_edit, psnr_ae = _seeded(model, seed), [], [], []
    with torch.no_grad():
        for start in range(0, n_images, batch_size):
            batch = slice(start, start + batch_size)
            x, m = to_float(images[batch]).to(model.device), masks[batch].to(model.device)
            out = model.inpaint(x, m, prompts[batch], steps=steps, guidance_scale=guidance_scale, resample=resample,
                                generator=generator)
            x_rec = model.decode_latents(model.encode_images(x, sample=False))
            psnr_edit.append(masked_psnr(x, out, ~m).cpu())
            psnr_ae.append(masked_psnr(x, x_rec, ~m).cpu())
            detections += detect(out)
    counts = dict.fromkeys(("recoloured", "other_kept", "edited"), 0)
    for dets, a, o in zip(detections, asked, other):
        d_asked, d_other = _nearest(dets, a), _nearest(dets, o)
        recoloured = d_asked is not None and d_asked["colour"] == a["colour"] and d_asked["shape"] == a["shape"]
        kept = d_other is not None and all(d_other[key] == o[key] for key in ATTRIBUTES)
        counts["recoloured"] += recoloured
        counts["other_kept"] += kept
        counts["edited"] += recoloured and kept
    report = {"steps": steps, "guidance_scale": guidance_scale, "resample": resample,
              "psnr_outside": torch.cat(psnr_edit).mean().item(),
              "psnr_outside_reconstruction": torch.cat(psnr_ae).mean().item(), **_shares(counts, n_images)}
    print(f"inpaint recolour: edited {_share(report, 'edited')}  masked object as asked {_share(report, 'recoloured')}"
          f"  other kept {_share(report, 'other_kept')}  PSNR outside {report['psnr_outside']:.2f} dB "
          f"(autoencoder alone {report['psnr_outside_reconstruction']:.2f} dB)")
    return report


def edit_tests(model, n_images, strengths, guidance_scale, steps=50, seed=0, batch_size=64):
    """7. recolour_test over `strengths` and inpaint_test, n_images each: {"recolour": ..., "inpaint": ...}."""
    return {"recolour": recolour_test(model, n_images, strengths, steps, guidance_scale, seed, batch_size),
            "inpaint": inpaint_test(model, n_images, steps, guidance_scale, seed=seed, batch_size=batch_size)}
