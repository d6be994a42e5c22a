"""Data: the captioned Shapes dataset, and a loader for your own captioned images.

Shapes is generated, not downloaded: every image is drawn from a handful of attributes, so every
image comes with exact ground truth that evaluation can check a generated image against.

  scene    one or two objects on a plain dark background
  object   shape (circle, square, triangle, cross) x colour (6 named colours)
           x size (small, large) x position (a 3x3 grid, plus a little jitter)
  caption  several templates and synonyms ("large"/"big", "top left"/"upper left");
           some captions leave attributes out ("a red circle"); two-object captions bind
           attributes to objects ("a red circle left of a blue square")

Determinism: image i of (seed, split) is a pure function of those three numbers. Every random
choice is a counter-based hash (splitmix64) of (seed, split, i, field), so images can be made in
any order, in any batch, on any machine, and come out the same.

Rendering is vectorised: each shape is a signed distance function (SDF) evaluated on the pixel grid
for a whole batch at once; coverage = clamp(0.5 - sdf_in_pixels, 0, 1) gives anti-aliased edges.

Your own data: a folder of images with `metadata.jsonl`, one line per image,
`{"file_name": "cat.png", "text": "a cat on a mat"}` (the image-folder convention of common
diffusion training scripts). See `ImageFolderDataset`.
"""

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

# ----------------------------------------------------------------------------------------------
# The vocabulary of the world

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {  # name -> RGB; hues ~45 degrees apart and saturated, so they stay apart when blurred
    "red": (230, 40, 40),
    "yellow": (240, 220, 40),
    "green": (40, 190, 60),
    "cyan": (40, 210, 220),
    "blue": (50, 90, 240),
    "purple": (170, 60, 220),
}
COLOUR_NAMES = tuple(COLOURS)
BACKGROUND = (20, 20, 25)  # a plain, dark background
SIZES = ("small", "large")
POSITIONS = ("top left", "top", "top right",
             "left", "center", "right",
             "bottom left", "bottom", "bottom right")  # index = 3 * row + col
RELATIONS = ("left of", "right of", "above", "below")
ATTRIBUTES = ("shape", "colour", "size", "position")  # what a caption can say of one object

SIZE_RADIUS = (0.09, 0.145)  # object "radius" as a fraction of the image side, per size
JITTER = 0.02                # max offset of an object from its grid cell's centre (image fraction)

# Synonyms: the first word of each list is the canonical one (used by `describe`).
SIZE_WORDS = {"small": ["small", "little"], "large": ["large", "big"]}
POSITION_WORDS = {
    "top left": ["top left", "upper left"], "top": ["top"], "top right": ["top right", "upper right"],
    "left": ["left"], "center": ["center", "middle"], "right": ["right"],
    "bottom left": ["bottom left", "lower left"], "bottom": ["bottom"],
    "bottom right": ["bottom right", "lower right"],
}
RELATION_WORDS = {"left of": ["left of", "to the left of"], "right of": ["right of", "to the right of"],
                  "above": ["above"], "below": ["below"]}
PREFIXES = ["", "", "there is ", "a picture of ", "an image of "]


def _where(position, word):
    """'top left' -> 'at the top left'; 'left' -> 'on the left'; 'center' -> 'in the center'."""
    prep = "in the" if position == "center" else "on the" if position in ("left", "right") else "at the"
    return f"{prep} {word}"


@dataclass
class ShapesConfig:
    image_size: int = 32              # H = W in pixels (any size >= 16; 32 and 64 are the presets)
    num_train: int = 20000            # images in the "train" split
    num_val: int = 1000               # images in the "val" split
    seed: int = 0                     # the whole dataset is a function of this seed
    two_object_prob: float = 0.25     # share of scenes with two objects (the rest have one)
    held_out: tuple = (("red", "triangle"), ("blue", "circle"))  # (colour, shape) never in train
    p_colour: float = 0.9             # probability that a caption mentions an object's colour
    p_size: float = 0.7               # ... its size
    p_position: float = 0.7           # ... its position (single-object captions; pairs use relations)

    def __post_init__(self):
        self.held_out = tuple(tuple(pair) for pair in self.held_out)  # JSON gives back lists
        for colour, shape in self.held_out:
            if colour not in COLOURS or shape not in SHAPES:
                raise ValueError(f"held_out pair ({colour!r}, {shape!r}) is not a known (colour, shape); "
                                 f"colours {COLOUR_NAMES}, shapes {SHAPES}")
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16 pixels, got {self.image_size}")


# ----------------------------------------------------------------------------------------------
# Counter-based randomness: u(seed, split, i, field) in [0, 1), the same everywhere

SPLITS = ("train", "val")
_N_FIELDS = 32  # random numbers drawn per image: the columns below, and 6 spare

# Which random number draws what. Image i gets one row u = _uniforms(seed, split, [i])[0] of _N_FIELDS
# uniforms; each column has one job. A pair [a, b] is (object 0, object 1).
# The scene (sample_scenes):
U_TWO_OBJECTS = 0           # two objects when u < two_object_prob, else one
U_COMBO = [1, 2]            # the (colour, shape) pair, among the pairs the split allows
U_CELL = 3                  # object 0's grid cell
U_OTHER_CELL = 4            # object 1's cell: 1..8 cells on from object 0's, so never the same
U_SIZE = [5, 6]             # small or large
U_JITTER_X = [7, 8]         # offset of the centre from the cell's centre, x
U_JITTER_Y = [9, 10]        # ... and y
# The caption (_caption):
U_SAY_COLOUR = [11, 14]     # the caption names the colour when u < p_colour
U_SAY_SIZE = [12, 15]       # ... the size when u < p_size
U_SIZE_WORD = [13, 16]      # which synonym of the size ("large" or "big")
U_PREFIX = 17               # which of PREFIXES starts the caption
U_SAY_POSITION = 18         # one object: the caption names its position when u < p_position
U_POSITION_WORD = 19        # one object: which synonym of the position ("top left" or "upper left")
U_PLACE_FIRST = 20          # one object: the place comes first ("in the center, a red circle") when u < 0.25
U_SAY_RELATION = 21         # two objects: a relation ("left of") when u < 0.6, else two places
U_RELATION = 22             # two objects: which of the relations that hold
U_RELATION_WORD = 23        # two objects: which synonym of the relation
U_PLACE_WORD = [24, 25]     # two objects, two places: which synonym of each position


def _splitmix64(x):
    """The splitmix64 mixing function on uint64 arrays (wraps modulo 2**64 by design)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _uniforms(seed, split, indices):
    """(N, _N_FIELDS) float64 uniforms in [0, 1), a pure function of (seed, split, index, field)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    idx = np.asarray(indices, dtype=np.uint64)
    key = _splitmix64(_splitmix64(np.uint64(seed)) ^ np.uint64(SPLITS.index(split) + 1))
    key = _splitmix64(key ^ idx)[:, None]                                 # (N, 1)
    fields = _splitmix64(np.arange(1, _N_FIELDS + 1, dtype=np.uint64))    # (F,)
    bits = _splitmix64(key ^ fields[None, :])                             # (N, F)
    return (bits >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _pick(u, n):
    """Uniform u in [0,1) -> integer in {0..n-1}."""
    return np.minimum((u * n).astype(np.int64), n - 1)


# ----------------------------------------------------------------------------------------------
# Scenes: the attributes of N images, as arrays

@dataclass
class Scenes:
    """Ground truth for N images; object slot 1 is unused where n_objects == 1."""
    n_objects: np.ndarray   # (N,) 1 or 2
    shape: np.ndarray       # (N, 2) index into SHAPES
    colour: np.ndarray      # (N, 2) index into COLOUR_NAMES
    size: np.ndarray        # (N, 2) index into SIZES
    cell: np.ndarray        # (N, 2) index into POSITIONS
    cx: np.ndarray          # (N, 2) object centre x, fraction of the image width
    cy: np.ndarray          # (N, 2) object centre y, fraction of the image height (down)
    choices: np.ndarray     # (N, _N_FIELDS) the image's uniforms (the column table); the caption reads them
    captions: list = field(default_factory=list)  # N strings
    mentions: list = field(default_factory=list)  # N lists of per-object dicts of bools
    relations: list = field(default_factory=list)  # N relation names or None

    def __len__(self):
        return len(self.n_objects)


def sample_scenes(cfg, split, indices):
    """Draw the attributes and captions of images `indices` of `split` (columns: the table above)."""
    u = _uniforms(cfg.seed, split, indices)                              # (N, _N_FIELDS)
    N = len(u)
    # (colour, shape) combinations allowed in this split: held-out pairs only outside "train"
    combos = [(c, s) for c in range(len(COLOURS)) for s in range(len(SHAPES))
              if split != "train" or (COLOUR_NAMES[c], SHAPES[s]) not in cfg.held_out]
    combo = np.array(combos)[_pick(u[:, U_COMBO], len(combos))]          # (N, 2, 2)
    cell0 = _pick(u[:, U_CELL], 9)
    cell1 = (cell0 + 1 + _pick(u[:, U_OTHER_CELL], 8)) % 9               # a different cell
    scenes = Scenes(
        n_objects=np.where(u[:, U_TWO_OBJECTS] < cfg.two_object_prob, 2, 1),
        colour=combo[..., 0], shape=combo[..., 1],
        size=_pick(u[:, U_SIZE], 2),
        cell=np.stack([cell0, cell1], axis=1),
        cx=None, cy=None, choices=u)
    col, row = scenes.cell % 3, scenes.cell // 3
    scenes.cx = (col + 0.5) / 3 + JITTER * (2 * u[:, U_JITTER_X] - 1)   # (N, 2)
    scenes.cy = (row + 0.5) / 3 + JITTER * (2 * u[:, U_JITTER_Y] - 1)   # (N, 2)
    for i in range(N):
        caption, mentions, relation = _caption(cfg, scenes, i)
        scenes.captions.append(caption)
        scenes.mentions.append(mentions)
        scenes.relations.append(relation)
    return scenes


def _noun_phrase(colour, shape, size, say_colour, say_size, u_size):
    words = ["a"]
    if say_size:
        synonyms = SIZE_WORDS[size]
        words.append(synonyms[_pick(u_size, len(synonyms))])
    if say_colour:
        words.append(colour)
    words.append(shape)
    return " ".join(words)


def _caption(cfg, scenes, i):
    """Caption image i from its attributes and its uniforms (the table above); also say what it mentions."""
    u = scenes.choices[i]                                                # (_N_FIELDS,)
    objects, mentions = [], []
    for k in range(scenes.n_objects[i]):
        say_colour, say_size = u[U_SAY_COLOUR[k]] < cfg.p_colour, u[U_SAY_SIZE[k]] < cfg.p_size
        name = _noun_phrase(COLOUR_NAMES[scenes.colour[i, k]], SHAPES[scenes.shape[i, k]],
                            SIZES[scenes.size[i, k]], say_colour, say_size, u[U_SIZE_WORD[k]])
        objects.append(name)
        mentions.append({"shape": True, "colour": bool(say_colour), "size": bool(say_size),
                         "position": False})
    prefix = PREFIXES[_pick(u[U_PREFIX], len(PREFIXES))]
    if scenes.n_objects[i] == 1:
        if u[U_SAY_POSITION] < cfg.p_position:
            position = POSITIONS[scenes.cell[i, 0]]
            word = POSITION_WORDS[position][_pick(u[U_POSITION_WORD], len(POSITION_WORDS[position]))]
            mentions[0]["position"] = True
            if u[U_PLACE_FIRST] < 0.25:  # the place first: "in the center, a red circle"
                return f"{_where(position, word)}, {objects[0]}", mentions, None
            return f"{prefix}{objects[0]} {_where(position, word)}", mentions, None
        return f"{prefix}{objects[0]}", mentions, None
    # two objects: relative ("a red circle left of a blue square") or absolute positions
    (c0, c1), (r0, r1) = scenes.cell[i] % 3, scenes.cell[i] // 3
    options = ([0 if c0 < c1 else 1] if c0 != c1 else []) + ([2 if r0 < r1 else 3] if r0 != r1 else [])
    if u[U_SAY_RELATION] < 0.6:
        relation = RELATIONS[options[_pick(u[U_RELATION], len(options))]]
        word = RELATION_WORDS[relation][_pick(u[U_RELATION_WORD], len(RELATION_WORDS[relation]))]
        return f"{prefix}{objects[0]} {word} {objects[1]}", mentions, relation
    places = []
    for k in range(2):
        position = POSITIONS[scenes.cell[i, k]]
        word = POSITION_WORDS[position][_pick(u[U_PLACE_WORD[k]], len(POSITION_WORDS[position]))]
        places.append(_where(position, word))
        mentions[k]["position"] = True
    return f"{prefix}{objects[0]} {places[0]} and {objects[1]} {places[1]}", mentions, None


def describe(shape, colour=None, size=None, position=None):
    """The canonical single-object caption, e.g. describe("circle", "red", "large", "top left")
    -> "a large red circle at the top left". Attributes left as None are not mentioned."""
    for value, allowed in ((shape, SHAPES), (colour, COLOUR_NAMES), (size, SIZES), (position, POSITIONS)):
        if value is not None and value not in allowed:
            raise ValueError(f"{value!r} is not one of {allowed}")
    words = ["a"] + ([size] if size else []) + ([colour] if colour else []) + [shape]
    text = " ".join(words)
    return f"{text} {_where(position, position)}" if position else text


def scene_attributes(scenes, i):
    """Image i's ground truth as a plain dict (JSON-ready)."""
    objects = [{"shape": SHAPES[scenes.shape[i, k]], "colour": COLOUR_NAMES[scenes.colour[i, k]],
                "size": SIZES[scenes.size[i, k]], "position": POSITIONS[scenes.cell[i, k]],
                "cx": float(scenes.cx[i, k]), "cy": float(scenes.cy[i, k])}
               for k in range(scenes.n_objects[i])]
    return {"caption": scenes.captions[i], "objects": objects, "mentions": scenes.mentions[i],
            "relation": scenes.relations[i]}


# ----------------------------------------------------------------------------------------------
# Rendering: signed distance functions on the pixel grid, a batch at a time

def _sd_box(px, py, bx, by):
    """Exact SDF of an axis-aligned box with half sizes (bx, by), centred at the origin."""
    dx, dy = px.abs() - bx, py.abs() - by
    outside = torch.sqrt(dx.clamp(min=0) ** 2 + dy.clamp(min=0) ** 2)
    return outside + torch.maximum(dx, dy).clamp(max=0)


def _sd_triangle(px, py, r):
    """Exact SDF of an upward equilateral triangle of half side r, centroid at the origin, y up."""
    k = math.sqrt(3.0)
    px, py = px.abs() - r, py + r / k
    fold = px + k * py > 0                          # reflect into the region nearest one edge
    px, py = torch.where(fold, (px - k * py) / 2, px), torch.where(fold, (-k * px - py) / 2, py)
    px = px - torch.maximum(px.clamp(max=0), -2 * r)
    return -torch.sqrt(px ** 2 + py ** 2) * torch.sign(py)


def _sd_circle(px, py, r):
    return torch.sqrt(px ** 2 + py ** 2) - r


def _sd_square(px, py, r):
    return _sd_box(px, py, 0.85 * r, 0.85 * r)      # half side 0.85 r: about the circle's area


def _sd_upright_triangle(px, py, r):
    # circumradius 1.15 r (area closer to the others' areas); centroid shifted down by a quarter
    # of the circumradius so that the triangle's bounding box is centred on the object
    big_r = 1.15 * r
    return _sd_triangle(px, -py + big_r / 4, big_r * math.sqrt(3) / 2)


def _sd_cross(px, py, r):
    arm = 0.35 * r                                  # half thickness of each bar
    return torch.minimum(_sd_box(px, py, r, arm), _sd_box(px, py, arm, r))


SHAPE_SDFS = (_sd_circle, _sd_square, _sd_upright_triangle, _sd_cross)  # same order as SHAPES


def render(scenes, image_size, device=None, batch_size=8192):
    """Draw scenes as uint8 images (N, 3, H, W), anti-aliased, on `device` (default CPU).

    Each object touches only a small square window of the image, so the SDF is evaluated on that
    window alone (S x S pixels, S ~ a third of the side) and the window is blended into the image
    with alpha = clamp(0.5 - sdf, 0, 1): the share of the pixel the shape covers.
    """
    N, H, W = len(scenes), image_size, image_size
    background = torch.tensor(BACKGROUND, dtype=torch.uint8, device=device).view(1, 3, 1, 1)
    out = background.expand(N, 3, H, W).contiguous()                   # (N, 3, H, W) uint8
    palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32, device=device)  # (6, 3)
    radius = torch.tensor(SIZE_RADIUS, dtype=torch.float32, device=device) * H           # (2,) px
    S = min(H, math.ceil(2 * 1.15 * radius.max().item()) + 3)          # window side, pixels
    steps = torch.arange(S, device=device)
    channels = torch.arange(3, device=device).view(1, 3, 1, 1)
    as_tensor = lambda a, dtype: torch.as_tensor(a, dtype=dtype, device=device)  # noqa: E731
    for start in range(0, N, batch_size):
        stop = min(N, start + batch_size)
        for k in range(2):  # paint object 0, then object 1 over it
            b = np.nonzero(scenes.n_objects[start:stop] > k)[0] + start  # images with an object k
            if len(b) == 0:
                continue
            cx = as_tensor(scenes.cx[b, k], torch.float32) * W           # (M,) centre in pixels
            cy = as_tensor(scenes.cy[b, k], torch.float32) * H
            left = (cx - S / 2).round().long().clamp(0, W - S)           # (M,) window corner
            top = (cy - S / 2).round().long().clamp(0, H - S)
            cols, rows = left[:, None] + steps, top[:, None] + steps     # (M, S) pixel indices
            px = (cols + 0.5 - cx[:, None])[:, None, :]                  # (M, 1, S) x from centre
            py = (rows + 0.5 - cy[:, None])[:, :, None]                  # (M, S, 1) y from centre
            r = radius[as_tensor(scenes.size[b, k], torch.long)].view(-1, 1, 1)
            shape = as_tensor(scenes.shape[b, k], torch.long)
            sdf = torch.empty(len(b), S, S, device=device)               # (M, S, S)
            for s, sd in enumerate(SHAPE_SDFS):                          # one SDF per shape kind
                m = shape == s
                sdf[m] = sd(px[m], py[m], r[m])
            alpha = (0.5 - sdf).clamp(0, 1)[:, None]                     # (M, 1, S, S) coverage
            colour = palette[as_tensor(scenes.colour[b, k], torch.long)].view(-1, 3, 1, 1)
            index = (as_tensor(b, torch.long).view(-1, 1, 1, 1), channels,
                     rows.view(-1, 1, S, 1), cols.view(-1, 1, 1, S))
            window = out[index].float()                                  # (M, 3, S, S)
            out[index] = (window * (1 - alpha) + colour * alpha).round().to(torch.uint8)
    return out


def to_float(images_uint8):
    """uint8 [0, 255] -> float [-1, 1], the range every model in tinyldm works in."""
    return images_uint8.float() / 127.5 - 1.0


def to_uint8(images):
    """float [-1, 1] -> uint8 [0, 255] (clamped)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class ShapesDataset(Dataset):
    """Split `split` of the Shapes dataset: item i is (image (3, H, W) float in [-1, 1], caption)."""

    def __init__(self, cfg, split="train"):
        self.cfg, self.split = cfg, split
        n = cfg.num_train if split == "train" else cfg.num_val
        self.scenes = sample_scenes(cfg, split, np.arange(n))
        self.captions = self.scenes.captions

    def __len__(self):
        return len(self.scenes)

    def __getitem__(self, i):
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        i = i % len(self)
        one = Scenes(**{k: v[i : i + 1] for k, v in vars(self.scenes).items()})
        return to_float(render(one, self.cfg.image_size)[0]), self.captions[i]

    def attributes(self, i):
        """Ground truth of image i: objects, caption, what the caption mentions."""
        return scene_attributes(self.scenes, i)

    def images_uint8(self, device=None):
        """The whole split as one uint8 tensor (N, 3, H, W), rendered in batches (for caching)."""
        return render(self.scenes, self.cfg.image_size, device=device)


# ----------------------------------------------------------------------------------------------
# Your own captioned images: a folder with metadata.jsonl

class DataError(ValueError):
    """A problem with a user's dataset folder; the message names the file and line."""


def _load_image(path, image_size):
    """Open an image, convert to RGB, resize the shorter side to image_size, centre-crop square."""
    from PIL import Image  # Pillow comes with matplotlib

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        scale = image_size / min(w, h)
        im = im.resize((max(image_size, round(w * scale)), max(image_size, round(h * scale))),
                       Image.Resampling.BICUBIC)
        w, h = im.size
        left, top = (w - image_size) // 2, (h - image_size) // 2
        im = im.crop((left, top, left + image_size, top + image_size))
        array = np.asarray(im, dtype=np.uint8)                            # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)               # (3, H, W)


def _read_utf8(path):
    """The text of `path`, or a DataError naming the line and byte where it is not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{path}, line {line}: not UTF-8 (byte 0x{data[e.start]:02x} at column {column}); "
                        "save the file as UTF-8") from None


class ImageFolderDataset(Dataset):
    """A folder of images with `metadata.jsonl` lines {"file_name": ..., "text": ...}.

    Item i is (image (3, image_size, image_size) float in [-1, 1], caption). The metadata (UTF-8) is
    checked when the dataset is made; each image is checked when it is read (`images_uint8` reads all).
    Empty captions are allowed (they train the unconditional case), but all of them empty is a warning.
    """

    def __init__(self, root, image_size):
        self.root, self.image_size = Path(root), image_size
        meta = self.root / "metadata.jsonl"
        if not self.root.is_dir():
            raise DataError(f"{self.root}: no such folder")
        if not meta.is_file():
            raise DataError(f"{meta}: missing; the folder needs a metadata.jsonl with lines "
                            '{"file_name": "img.png", "text": "a caption"}')
        self.files, self.captions, self.lines = [], [], []
        for line_no, line in enumerate(_read_utf8(meta).splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{meta}, line {line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            if not isinstance(record.get("file_name"), str) or not record["file_name"]:
                raise DataError(f'{where}: no "file_name"')
            if not isinstance(record.get("text"), str):
                raise DataError(f'{where}: no "text" (the caption) for {record["file_name"]}')
            path = self.root / record["file_name"]
            if not path.is_file():
                raise DataError(f"{where}: image {path} does not exist")
            self.files.append(path)
            self.captions.append(record["text"])
            self.lines.append(line_no)
        if not self.files:
            raise DataError(f"{meta}: no images listed (the file is empty)")
        if not any(caption.strip() for caption in self.captions):
            # allowed (an unconditional model is a model), but almost never what was meant
            warnings.warn(f"{meta}: every caption is empty, so the model will be unconditional: "
                          "it learns the images without text, and prompts will have no effect", stacklevel=2)

    def __len__(self):
        return len(self.files)

    def _read(self, i):
        try:
            return _load_image(self.files[i], self.image_size)
        except Exception as e:  # Pillow raises several kinds; all mean the same to the user
            raise DataError(f"{self.root / 'metadata.jsonl'}, line {self.lines[i]}: cannot read image "
                            f"{self.files[i]} ({type(e).__name__}: {e})") from None

    def __getitem__(self, i):
        return to_float(self._read(i)), self.captions[i]

    def images_uint8(self, device=None):
        """Every image as one uint8 tensor (N, 3, H, W)."""
        return torch.stack([self._read(i) for i in range(len(self))]).to(device)

