"""The captioned Shapes dataset and the image-folder loader (tinyldm/data.py)."""

import json
import warnings

import numpy as np
import pytest
import torch

from tinyldm.data import (BACKGROUND, COLOURS, POSITION_WORDS, POSITIONS, SHAPES, SIZE_WORDS,
                          DataError, ImageFolderDataset, ShapesConfig, ShapesDataset, describe,
                          render, sample_scenes)


@pytest.fixture(scope="module")
def train():
    return ShapesDataset(ShapesConfig(image_size=32, num_train=3000, num_val=600), "train")


@pytest.fixture(scope="module")
def train_images(train):
    return train.images_uint8()


@pytest.fixture(scope="module")
def val():
    return ShapesDataset(ShapesConfig(image_size=32, num_train=3000, num_val=600), "val")


def test_images_are_float_in_range_and_both_sizes_work():
    """Item i is ((3, H, W) float in [-1, 1], str) for H = 32 and 64."""
    for size in (32, 64):
        ds = ShapesDataset(ShapesConfig(image_size=size, num_train=4), "train")
        x, caption = ds[0]
        assert x.shape == (3, size, size) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1 and isinstance(caption, str) and caption


def test_deterministic_by_seed_split_index():
    """Image i depends only on (seed, split, i): not on the batch it was drawn with, nor the call."""
    cfg = ShapesConfig(num_train=50)
    a = sample_scenes(cfg, "train", np.arange(50))
    b = sample_scenes(cfg, "train", np.array([7, 30, 3]))
    assert [a.captions[i] for i in (7, 30, 3)] == b.captions
    images_a = render(a, 32)
    assert torch.equal(images_a[[7, 30, 3]], render(b, 32))
    assert torch.equal(images_a, render(sample_scenes(cfg, "train", np.arange(50)), 32))
    assert torch.equal(ShapesDataset(cfg)[5][0], ShapesDataset(cfg)[5][0])


def test_each_random_column_draws_one_thing():
    """The column table of data.py: every U_* column is a distinct field of the image's uniforms."""
    import tinyldm.data as data
    columns = [c for name, v in vars(data).items() if name.startswith("U_")
               for c in (v if isinstance(v, list) else [v])]
    assert len(columns) == len(set(columns)) and all(0 <= c < data._N_FIELDS for c in columns)


def test_captions_are_fixed_by_the_seed():
    """The dataset is a function of the seed: these captions of seed 0 stay the same from version to version."""
    scenes = sample_scenes(ShapesConfig(), "train", np.array([0, 1, 11, 13]))
    assert scenes.captions == ["an image of a small yellow circle at the top", "a large blue triangle",
                               "a picture of a large red cross at the top left and a large purple cross at "
                               "the top right", "an image of a small green triangle above a big purple circle"]


def test_seed_and_split_change_the_data():
    """Another seed, or the other split, gives other images."""
    base = sample_scenes(ShapesConfig(), "train", np.arange(200))
    other_seed = sample_scenes(ShapesConfig(seed=1), "train", np.arange(200))
    other_split = sample_scenes(ShapesConfig(), "val", np.arange(200))
    assert base.captions != other_seed.captions and base.captions != other_split.captions
    with pytest.raises(ValueError, match="split"):
        sample_scenes(ShapesConfig(), "test", np.arange(3))


def _phrase_ok(text, obj, mention):
    """Check one object's noun phrase + place against its ground truth, with an independent parse."""
    words = text.split()
    colours = [w for w in words if w in COLOURS]
    assert colours == ([obj["colour"]] if mention["colour"] else []), (text, obj)
    shapes = [w for w in words if w in SHAPES]
    assert shapes == [obj["shape"]], (text, obj)
    size_words = {w: s for s, ws in SIZE_WORDS.items() for w in ws}
    sizes = [size_words[w] for w in words if w in size_words]
    assert sizes == ([obj["size"]] if mention["size"] else []), (text, obj)
    if mention["position"]:
        assert any(text.endswith(f" the {w}") or f" the {w}," in f" {text}"
                   for w in POSITION_WORDS[obj["position"]]), (text, obj)
    else:
        assert not any(f"the {w}" in text for ws in POSITION_WORDS.values() for w in ws), text


def test_captions_agree_with_ground_truth(train):
    """The caption's words name exactly the attributes the ground truth says it mentions."""
    relations = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}
    seen_partial = seen_two = 0
    for i in range(len(train)):
        a = train.attributes(i)
        caption, objects, mentions = a["caption"], a["objects"], a["mentions"]
        assert caption == train.captions[i]
        if len(objects) == 1:
            text = caption.split(", ")[::-1]  # "in the center, a red circle" -> object first
            _phrase_ok(" ".join(text), objects[0], mentions[0])
            seen_partial += not all(mentions[0].values())
            continue
        seen_two += 1
        if a["relation"] is None:
            first, second = caption.split(" and ")
        else:
            axis, sign = relations[a["relation"]]
            col_row = [(POSITIONS.index(o["position"]) % 3, POSITIONS.index(o["position"]) // 3)
                       for o in objects]
            assert np.sign(col_row[0][axis] - col_row[1][axis]) == sign, (caption, objects)
            word = a["relation"] if f" {a['relation']} " in caption else a["relation"].replace(" of", "")
            first, second = caption.split(f" {word} ", 1)
            if first.endswith(" to the"):
                first = first[: -len(" to the")]
        _phrase_ok(first, objects[0], mentions[0])
        _phrase_ok(second, objects[1], mentions[1])
    assert seen_partial > 100 and seen_two > 300  # the templates really vary


def test_synonyms_and_templates_vary(train):
    """Several templates and synonyms appear in the captions."""
    text = " | ".join(train.captions)
    for phrase in ("big", "large", "little", "small", "upper left", "top left", "there is",
                   "a picture of", "left of", " and ", "middle"):
        assert phrase in text, phrase


def test_held_out_pairs_absent_from_train_present_in_val(train, val):
    """Held-out (colour, shape) pairs never occur in train and do occur in val."""
    held_out = set(train.cfg.held_out)

    def pairs(ds):
        return {(o["colour"], o["shape"]) for i in range(len(ds)) for o in ds.attributes(i)["objects"]}

    assert not pairs(train) & held_out
    assert held_out <= pairs(val)
    assert len(pairs(train)) == len(COLOURS) * len(SHAPES) - len(held_out)


def test_centre_pixel_has_the_named_colour(train, train_images):
    """Each object's centre pixel is exactly its colour."""
    images = train_images
    H = images.shape[-1]
    for i in range(400):
        for obj in train.attributes(i)["objects"]:
            x, y = int(obj["cx"] * H), int(obj["cy"] * H)
            assert tuple(images[i, :, y, x].tolist()) == COLOURS[obj["colour"]], (i, obj)


def test_area_grows_with_size_and_edges_are_anti_aliased():
    """Large shapes cover ~(0.145/0.09)² more pixels than small ones; edges have blended pixels."""
    cfg = ShapesConfig(image_size=64, num_train=2000, two_object_prob=0.0)
    ds = ShapesDataset(cfg)
    images = ds.images_uint8().float()
    background = torch.tensor(BACKGROUND, dtype=torch.float32).view(1, 3, 1, 1)
    palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32)
    colours = palette[ds.scenes.colour[:, 0]].view(-1, 3, 1, 1)
    # coverage per pixel, recovered from the blend img = bg·(1-α) + colour·α
    alpha = ((images - background) * (colours - background)).sum(1) / ((colours - background) ** 2).sum(1)
    area = alpha.sum(dim=(1, 2))
    partial = ((alpha > 0.05) & (alpha < 0.95)).sum(dim=(1, 2))
    assert (partial > 0).all()  # every shape has anti-aliased edge pixels
    for k, shape in enumerate(SHAPES):
        by_size = [area[torch.from_numpy((ds.scenes.shape[:, 0] == k) & (ds.scenes.size[:, 0] == s))]
                   for s in (0, 1)]
        ratio = by_size[1].mean() / by_size[0].mean()
        assert 2.2 < ratio < 3.0, (shape, ratio)
        assert by_size[0].std() / by_size[0].mean() < 0.05  # jitter moves shapes, not their area


def test_two_objects_do_not_hide_each_other(train, train_images):
    """In two-object scenes both objects stay visible: their cells differ and they do not overlap."""
    images = train_images
    H = images.shape[-1]
    two = [i for i in range(len(train)) if len(train.attributes(i)["objects"]) == 2]
    for i in two:
        a, b = train.attributes(i)["objects"]
        assert a["position"] != b["position"]
        x, y = int(a["cx"] * H), int(a["cy"] * H)
        assert tuple(images[i, :, y, x].tolist()) == COLOURS[a["colour"]]


def test_describe_gives_canonical_captions():
    """describe() writes the canonical template and rejects unknown attributes."""
    assert describe("circle", "red", "large", "top left") == "a large red circle at the top left"
    assert describe("square") == "a square"
    assert describe("cross", position="center") == "a cross in the center"
    with pytest.raises(ValueError, match="hexagon"):
        describe("hexagon")


def test_bad_config_is_rejected():
    """Unknown held-out pairs and too-small images are clear errors."""
    with pytest.raises(ValueError, match="held_out"):
        ShapesConfig(held_out=(("pink", "circle"),))
    with pytest.raises(ValueError, match="image_size"):
        ShapesConfig(image_size=8)


# ---- user data: a folder with metadata.jsonl ------------------------------------------------

def _write_png(path, array):
    from PIL import Image
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def test_image_folder_loads_resizes_and_centre_crops(tmp_path):
    """A wide image is resized by its shorter side and centre-cropped to image_size x image_size."""
    wide = np.zeros((40, 120, 3), dtype=np.uint8)
    wide[:, :40] = (0, 255, 0)
    wide[:, 40:80] = (255, 0, 0)   # the middle third is what a centre crop keeps
    wide[:, 80:] = (0, 0, 255)
    _write_png(tmp_path / "wide.png", wide)
    _write_png(tmp_path / "small.png", np.full((8, 8, 3), 200))
    lines = [{"file_name": "wide.png", "text": "stripes"}, {"file_name": "small.png", "text": "grey"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    ds = ImageFolderDataset(tmp_path, image_size=16)
    assert len(ds) == 2 and ds.captions == ["stripes", "grey"]
    x, caption = ds[0]
    assert x.shape == (3, 16, 16) and caption == "stripes"
    images = ds.images_uint8()
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.uint8
    assert (images[0, 0, :, 2:-2] > 200).all() and (images[0, 1:, :, 2:-2] < 50).all()  # all red
    assert (images[1] == 200).all()  # upscaled grey stays grey


@pytest.mark.parametrize("case, message", [
    ("no_folder", "no such folder"),
    ("no_metadata", "metadata.jsonl: missing"),
    ("empty", "no images listed"),
    ("bad_json", "line 2: not valid JSON"),
    ("not_object", "line 1: expected a JSON object"),
    ("no_text", "line 2: no \"text\""),
    ("no_file_name", "line 1: no \"file_name\""),
    ("missing_image", "line 2: image .*gone.png does not exist"),
])
def test_image_folder_errors_name_file_and_line(tmp_path, case, message):
    """Each kind of bad input is a DataError that names the file and the line."""
    root = tmp_path / "data"
    if case != "no_folder":
        root.mkdir()
        _write_png(root / "ok.png", np.zeros((8, 8, 3)))
    good = json.dumps({"file_name": "ok.png", "text": "a caption"})
    content = {
        "empty": "\n",
        "bad_json": good + '\n{"file_name": "ok.png", "text": \n',
        "not_object": '["ok.png", "a caption"]\n',
        "no_text": good + '\n{"file_name": "ok.png"}\n',
        "no_file_name": '{"text": "a caption"}\n',
        "missing_image": good + '\n{"file_name": "gone.png", "text": "x"}\n',
    }.get(case)
    if content is not None:
        (root / "metadata.jsonl").write_text(content)
    with pytest.raises(DataError, match=message):
        ImageFolderDataset(root, image_size=8)


def test_image_folder_unreadable_image_names_file_and_line(tmp_path):
    """A file that is not an image fails when read, naming metadata line and file."""
    _write_png(tmp_path / "ok.png", np.zeros((8, 8, 3)))
    (tmp_path / "broken.png").write_bytes(b"this is not a png")
    (tmp_path / "metadata.jsonl").write_text(
        json.dumps({"file_name": "ok.png", "text": "fine"}) + "\n"
        + json.dumps({"file_name": "broken.png", "text": "broken"}) + "\n")
    ds = ImageFolderDataset(tmp_path, image_size=8)
    assert ds[0][0].shape == (3, 8, 8)
    with pytest.raises(DataError, match=r"line 2: cannot read image .*broken\.png"):
        ds.images_uint8()


# ---- the same folders as `train_small.py --data` meets them -----------------------------------

def _captioned_folder(root, lines):
    """A --data folder with one 8x8 image per metadata line; lines are bytes, written as given."""
    root.mkdir()
    for i in range(len(lines)):
        _write_png(root / f"{i}.png", np.full((8, 8, 3), 40 * i))
    (root / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return root


def _line(i, text):
    return json.dumps({"file_name": f"{i}.png", "text": text}, ensure_ascii=False).encode("utf-8")


def test_train_on_latin1_metadata_names_file_line_and_byte(tmp_path):
    """metadata.jsonl saved as latin-1: one line naming the file, the line and the byte, before any file is written."""
    import train_small
    from conftest import TINY

    latin1 = json.dumps({"file_name": "1.png", "text": "un cercle doré"}, ensure_ascii=False).encode("latin-1")
    data = _captioned_folder(tmp_path / "data", [_line(0, "a red circle"), latin1])
    runs = tmp_path / "runs"
    with pytest.raises(SystemExit, match=r"^--data: .*metadata\.jsonl, line 2: not UTF-8 \(byte 0xe9 at column 46\); "
                                         r"save the file as UTF-8$"):
        train_small.main([*TINY, "--data", str(data), "--runs-dir", str(runs), "--name", "latin1"])
    assert not (runs / "latin1").exists()


class _StopAfterData(Exception):
    pass


def test_train_on_empty_captions_warns_the_model_is_unconditional(tmp_path, monkeypatch):
    """A --data folder whose captions are all empty trains, but says the model will be unconditional.
    (The run is stopped right after the data stage: the warning is what is tested, not the training.)"""
    import train_small
    from conftest import TINY

    def stop(*args, **kwargs):
        raise _StopAfterData

    monkeypatch.setattr(train_small, "train_tokenizer", stop)

    def train(data):
        with warnings.catch_warnings(record=True) as caught, pytest.raises(_StopAfterData):
            warnings.simplefilter("always")
            train_small.main([*TINY, "--data", str(data), "--runs-dir", str(tmp_path / "runs"), "--name", data.name])
        return [str(w.message) for w in caught if "caption" in str(w.message)]

    empty = _captioned_folder(tmp_path / "empty", [_line(0, ""), _line(1, "  "), _line(2, "")])
    assert train(empty) == [f"{empty / 'metadata.jsonl'}: every caption is empty, so the model will be unconditional: "
                            "it learns the images without text, and prompts will have no effect"]
    assert train(_captioned_folder(tmp_path / "one", [_line(0, ""), _line(1, "a grey square")])) == []
