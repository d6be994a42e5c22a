"""A damaged run folder is one line naming the broken file and how it is broken, never a traceback.

Each test saves a tiny model (and classifier), damages one file, then runs `python -m tinyldm sample` on it.
"""

import json

import pytest
import torch

import tinyldm.__main__ as cli
from tinyldm.classifier import ClassifierConfig, LatentClassifier, save_classifier
from tinyldm.ldm import LatentDiffusion

from test_ldm import tiny_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The files of a good run folder with a classifier, as bytes: each test damages its own copy."""
    run = tmp_path_factory.mktemp("good")
    tiny_model().save(run)
    save_classifier(LatentClassifier(ClassifierConfig(channels=8, channel_mult=(1,), num_groups=4, time_dim=16)), run)
    return {p.name: p.read_bytes() for p in run.iterdir()}


@pytest.fixture
def run(saved, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    for name, data in saved.items():
        (folder / name).write_bytes(data)
    return folder


def sample(run, *extra):
    """`python -m tinyldm sample` on run; the PNG it would write."""
    out = run.parent / "samples.png"
    cli.main(["sample", "a red circle", "--run", str(run), "--out", str(out), "--num-images", "1",
              "--steps", "2", "--device", "cpu", *extra])
    return out


def edit_json(path, edit):
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg))


def test_the_good_folder_samples(run):
    assert sample(run).is_file()
    assert sample(run, "--classifier-scale", "1", "--target", "colour=red").is_file()


WEIGHTS_DAMAGE = {
    "truncated": (lambda data: data[: len(data) // 2], "not a readable weights file"),
    "empty": (lambda data: b"", "empty file"),
    "not weights": (lambda data: b"hello", "not a readable weights file"),
}


@pytest.mark.parametrize("damage", WEIGHTS_DAMAGE)
@pytest.mark.parametrize("name", ["model.pt", "classifier.pt"])
def test_broken_weights_file(run, name, damage):
    cut, message = WEIGHTS_DAMAGE[damage]
    (run / name).write_bytes(cut((run / name).read_bytes()))
    with pytest.raises(SystemExit, match=rf"^error: .*{name}: {message}") as e:
        sample(run, "--classifier-scale", "1", "--target", "colour=red")
    assert "\n" not in str(e.value)
    assert not (run.parent / "samples.png").exists()


def _drop_text_encoder(cfg):
    del cfg["text_encoder"]


def _unknown_unet_key(cfg):
    cfg["unet"]["widht"] = 3


def _unknown_top_key(cfg):
    cfg["extra"] = 1


def _drop_image_size(cfg):
    del cfg["image_size"]


def _scale_per_channel_too_short(cfg):
    cfg["scale_factor"] = [1.0, 1.0, 1.0]  # the latents have 4 channels


def _shift_not_a_number(cfg):
    cfg["latent_shift"] = "0.1"


def _bad_value(cfg):
    cfg["unet"]["num_heads"] = 5  # does not divide the widths: the U-Net's own check says so


MODEL_JSON_DAMAGE = {
    "missing entry": (_drop_text_encoder, r"no 'text_encoder' entry"),
    "unknown key": (_unknown_unet_key, r"'unet' has unknown key\(s\) widht"),
    "unknown top-level key": (_unknown_top_key, r"unknown key\(s\) extra"),
    "missing image size": (_drop_image_size, r"'image_size' must be a number, got 'nothing'"),
    "impossible value": (_bad_value, r"num_heads"),
    "scale of the wrong length": (_scale_per_channel_too_short, r"scale_factor has 3 entries, the autoencoder "
                                                                r"has 4 latent channels"),
    "shift not a number": (_shift_not_a_number, r"'latent_shift' must be a number or a list of numbers, got '0.1'"),
}


@pytest.mark.parametrize("damage", MODEL_JSON_DAMAGE)
def test_model_json_with_a_key_too_many_or_too_few(run, damage):
    edit, message = MODEL_JSON_DAMAGE[damage]
    edit_json(run / "model.json", edit)
    with pytest.raises(SystemExit, match=rf"^error: .*model.json: {message}") as e:
        sample(run)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["model.json", "classifier.json"])
@pytest.mark.parametrize("text", ["{\"unet\": {", "[1, 2]"])
def test_json_file_that_is_not_a_json_object(run, name, text):
    (run / name).write_text(text)
    with pytest.raises(SystemExit, match=rf"^error: .*{name}: (not valid JSON|expected a JSON object)"):
        sample(run, "--classifier-scale", "1", "--target", "colour=red")


@pytest.mark.parametrize("name", ["model.json", "classifier.json"])
def test_empty_json_file(run, name):
    (run / name).write_text("")
    with pytest.raises(SystemExit, match=rf"^error: .*{name}: empty file"):
        sample(run, "--classifier-scale", "1", "--target", "colour=red")


def test_classifier_json_without_its_weights(run):
    (run / "classifier.pt").unlink()
    with pytest.raises(SystemExit, match=r"^error: run folder .* is incomplete: classifier.json without classifier.pt"):
        sample(run, "--classifier-scale", "1", "--target", "colour=red")


def test_a_field_saved_before_it_existed_takes_its_default(run):
    """Run folders written before a config field was added still load: the field takes its default. Had
    the missing field mattered, the model it builds does not fit together, and the error says so."""
    edit_json(run / "model.json", lambda cfg: cfg["diffusion"].pop("p_noisy_t"))
    assert sample(run).is_file()
    edit_json(run / "model.json", lambda cfg: cfg["text_encoder"].pop("d_model"))
    with pytest.raises(SystemExit, match=r"^error: .*model.json: text encoder width 128 != U-Net context_dim 32"):
        sample(run)


def test_classifier_json_with_an_unknown_key(run):
    edit_json(run / "classifier.json", lambda cfg: cfg.update(chanels=8))
    with pytest.raises(SystemExit, match=r"^error: .*classifier.json: 'classifier' has unknown key\(s\) chanels"):
        sample(run, "--classifier-scale", "1", "--target", "colour=red")


@pytest.mark.parametrize("text", ["", "{not json", "{\"model\": 1}"])
def test_corrupt_tokenizer(run, text):
    (run / "tokenizer.json").write_text(text)
    with pytest.raises(SystemExit, match=r"^error: .*tokenizer.json: not a valid tokenizer file") as e:
        sample(run)
    assert "\n" not in str(e.value)


def test_tokenizer_larger_than_the_text_encoder(run):
    edit_json(run / "model.json", lambda cfg: cfg["text_encoder"].update(vocab_size=5))
    with pytest.raises(SystemExit, match=r"^error: .*tokenizer.json: \d+ words, more than .* vocab_size 5"):
        sample(run)


@pytest.mark.parametrize("component, key, value", [("unet", "model_channels", 32),
                                                   ("autoencoder", "base_channels", 16)])
def test_shapes_that_do_not_match_the_config(run, component, key, value):
    """model.json edited after training (or model.pt from another run): the first tensor that differs."""
    edit_json(run / "model.json", lambda cfg: cfg[component].update({key: value}))
    with pytest.raises(SystemExit, match=rf"^error: .*model.pt: {component}\.\S+ is shape \(.*\), but the config "
                                         r"beside it builds \(.*\)") as e:
        sample(run)
    assert "\n" not in str(e.value)


def test_weights_missing_a_component_or_a_tensor(run):
    state = torch.load(run / "model.pt", weights_only=True)
    del state["unet"]["out.weight" if "out.weight" in state["unet"] else next(iter(state["unet"]))]
    torch.save(state, run / "model.pt")
    with pytest.raises(SystemExit, match=r"^error: .*model.pt: unet weights do not match .*\(missing "):
        sample(run)
    del state["unet"]
    torch.save(state, run / "model.pt")
    with pytest.raises(SystemExit, match=r"^error: .*model.pt: no 'unet' weights"):
        sample(run)


def test_load_raises_run_folder_error(run):
    """For code that loads a run itself: a ValueError subclass, naming the file."""
    from tinyldm.ldm import RunFolderError

    (run / "model.json").write_text("{")
    with pytest.raises(RunFolderError, match="model.json"):
        LatentDiffusion.load(run)
