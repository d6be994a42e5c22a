"""End to end: train_small.py (all stages), resume, DDP, checkpoints, NaN guard, CLI errors."""

import json
import signal
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import train_small
from tinyldm.__main__ import main as cli
from tinyldm.ldm import LatentDiffusion

from conftest import TINY, finish, run_script


@pytest.fixture
def reference_run(tiny_run):
    """The session's uninterrupted tiny run (conftest.py): the reference for resume, and the e2e checks."""
    return tiny_run


def test_tiny_run_leaves_a_complete_run_folder(reference_run):
    """All stages run; the folder holds the model, logs, plots and metrics, and no checkpoint."""
    for name in ("train_config.json", "model.json", "tokenizer.json", "model.pt", "log.jsonl", "loss.png",
                 "samples_final.png", "reconstructions.png", "metrics.json", "classifier_accuracy.png",
                 "classifier.json", "classifier.pt"):
        assert (reference_run / name).is_file(), name
    assert not (reference_run / "checkpoint.pt").exists()
    metrics = json.loads((reference_run / "metrics.json").read_text())
    for key in ("autoencoder_psnr_db", "scale_factor", "final_loss", "time_total_s", "classifier_accuracy_by_t"):
        assert key in metrics
    assert len(metrics["classifier_accuracy_by_t"]["all"]) == 10  # accuracy per timestep bin
    log = [json.loads(line) for line in (reference_run / "log.jsonl").read_text().splitlines()]
    for stage in (1, 3):
        losses = [r["loss"] for r in log if r["stage"] == stage]
        assert losses[-1] < losses[0], (stage, losses)  # it learns


def test_load_and_sample(reference_run):
    """LatentDiffusion.load rebuilds the model (weights_only) and generate() gives images in [-1, 1]."""
    model = LatentDiffusion.load(reference_run)
    generator = torch.Generator().manual_seed(0)
    images = model.generate(["a red circle", "", "a zebra " * 30], steps=3, guidance_scale=2.0,
                            generator=generator)
    assert images.shape == (3, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    again = model.generate(["a red circle"], steps=3, guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(images[:1], again, atol=1e-5)  # the generator makes it reproducible
    state = torch.load(reference_run / "model.pt", weights_only=True)
    assert set(state) == {"text_encoder", "autoencoder", "unet"}  # the classifier has its own files
    from tinyldm.classifier import classifier_targets, load_classifier, make_classifier_grad

    classifier = load_classifier(reference_run)
    assert set(torch.load(reference_run / "classifier.pt", weights_only=True)) == set(classifier.state_dict())
    grad = make_classifier_grad(classifier, classifier_targets({"colour": "red", "shape": "circle"}))
    plain = model.generate([""], steps=3, guidance_scale=1.0, generator=torch.Generator().manual_seed(0))
    guided = model.generate([""], steps=3, guidance_scale=1.0, generator=torch.Generator().manual_seed(0),
                            classifier_grad=grad, classifier_scale=5.0)
    assert guided.shape == plain.shape and not torch.equal(guided, plain)  # classifier guidance acts


def test_sample_command_line(reference_run, tmp_path):
    """`python -m tinyldm sample` writes a PNG grid; a missing or incomplete run is a clear error."""
    out = tmp_path / "grid.png"
    cli(["sample", "--run", str(reference_run), "--out", str(out), "--num-images", "2", "--steps", "3",
         "a red circle", "a blue square"])
    assert out.stat().st_size > 1000
    cli(["sample", "--run", str(reference_run), "--out", str(out), "--num-images", "1", "--steps", "2",
         "--classifier-scale", "2", "--target", "colour=red,shape=circle", ""])
    with pytest.raises(SystemExit, match="--target"):
        cli(["sample", "--run", str(reference_run), "--classifier-scale", "2", "--target", "color=red", ""])
    with pytest.raises(SystemExit, match="does not exist"):
        cli(["sample", "--run", str(tmp_path / "nothing"), "a red circle"])
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model.json").write_text("{}")
    with pytest.raises(SystemExit, match="incomplete: missing tokenizer.json, model.pt"):
        cli(["sample", "--run", str(tmp_path / "half"), "a red circle"])


def _wait_for_log(run_dir, stage, step, proc, timeout=120):
    """Wait until log.jsonl shows `stage` at `step` or later."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        log = run_dir / "log.jsonl"
        if log.exists() and any(json.loads(line)["stage"] == stage and json.loads(line)["step"] >= step
                                for line in log.read_text().splitlines() if line.strip()):
            return
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the log")


def test_ctrl_c_and_resume_end_where_an_uninterrupted_run_ends(reference_run, tmp_path):
    """Ctrl-C in stage 1 and again in stage 3, each followed by --resume: same weights as the reference."""
    args = ["train_small.py", *TINY, "--runs-dir", str(tmp_path), "--name", "ref"]
    run_dir = tmp_path / "ref"
    for stage, step in ((1, 10), (3, 10)):
        proc = run_script(args + (["--resume"] if stage == 3 else []))
        _wait_for_log(run_dir, stage, step, proc)
        proc.send_signal(signal.SIGINT)
        code, out = finish(proc)
        assert code != 0 and "checkpoint saved" in out, out
        assert (run_dir / "checkpoint.pt").is_file() and not (run_dir / "model.pt").exists()
    code, out = finish(run_script(args + ["--resume"]))
    assert code == 0, out
    ours = torch.load(run_dir / "model.pt", weights_only=True)
    reference = torch.load(reference_run / "model.pt", weights_only=True)
    for part in reference:
        for key, value in reference[part].items():
            assert torch.equal(ours[part][key], value), (part, key)
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    keys = [(r["stage"], r["step"]) for r in log]
    assert len(keys) == len(set(keys)) and keys == sorted(keys)  # no duplicated or lost log lines


def test_torchrun_two_cpu_processes(tmp_path):
    """`torchrun --nproc_per_node=2` trains with DDP over gloo; only rank 0 writes."""
    proc = run_script(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_small.py",
                       *TINY, "--ae-steps", "10", "--steps", "10", "--classifier-steps", "5", "--runs-dir", str(tmp_path),
                       "--name", "ddp"])
    code, out = finish(proc)
    assert code == 0, out
    log = [json.loads(line) for line in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    keys = [(r["stage"], r["step"]) for r in log]
    assert len(keys) == len(set(keys))  # one writer
    assert json.loads((tmp_path / "ddp" / "metrics.json").read_text())["world_size"] == 2
    LatentDiffusion.load(tmp_path / "ddp")


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A crash in the middle of saving leaves the previous checkpoint intact and loadable."""
    train_small.save_checkpoint(tmp_path, {"step": 1, "w": torch.ones(3)})

    def crash(obj, path):
        Path(path).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        train_small.save_checkpoint(tmp_path, {"step": 2, "w": torch.zeros(3)})
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """A NaN loss in stage 3 stops with a clear message; checkpoint.pt is still finite and loadable."""
    import tinyldm.ldm

    real, calls = tinyldm.ldm.diffusion_loss, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) > 22 else loss

    monkeypatch.setattr(tinyldm.ldm, "diffusion_loss", poisoned)
    with pytest.raises(SystemExit, match="loss is nan"):
        train_small.main([*TINY, "--ae-steps", "4", "--runs-dir", str(tmp_path), "--name", "nan"])
    state = torch.load(tmp_path / "nan" / "checkpoint.pt", weights_only=True)
    assert state["stage"] == 3 and state["step"] == 20
    assert all(torch.isfinite(v).all() for v in state["unet"].values())
    assert not (tmp_path / "nan" / "model.pt").exists()


def test_command_line_errors(tmp_path):
    """Existing run without --resume, --resume with other settings or of nothing, a bad --data folder."""
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "train_config.json").write_text(json.dumps({"steps": 1}))
    base = [*TINY, "--runs-dir", str(tmp_path)]
    with pytest.raises(SystemExit, match="already exists"):
        train_small.main([*base, "--name", "taken"])
    with pytest.raises(SystemExit, match="other settings: .*steps=1"):
        train_small.main([*base, "--name", "taken", "--resume"])
    # a train_config.json from before scale_shift existed was trained without it: resuming with today's default
    # (AdaGN) is refused, with --no-scale-shift it is the same run
    (tmp_path / "old").mkdir()
    old = {k: v for k, v in asdict(train_small.parse_args([*base, "--name", "old"])).items() if k != "scale_shift"}
    (tmp_path / "old" / "train_config.json").write_text(json.dumps(old))
    with pytest.raises(SystemExit, match=r"other settings: scale_shift=False \(now True\)$"):
        train_small.main([*base, "--name", "old", "--resume"])
    resumed = train_small.parse_args([*base, "--name", "old", "--resume", "--no-scale-shift"])
    assert train_small.open_run_folder(resumed, tmp_path / "old", torch.device("cpu")) is None  # no checkpoint yet
    with pytest.raises(SystemExit, match="no run to resume"):
        train_small.main([*base, "--name", "nothing", "--resume"])
    with pytest.raises(SystemExit, match="metadata.jsonl"):
        train_small.main([*base, "--name", "d", "--data", str(tmp_path / "taken")])
    with pytest.raises(SystemExit):
        train_small.main([*base, "--preset", "huge"])


def test_evaluate_command_line(reference_run, tmp_path):
    """`python -m tinyldm evaluate` sweeps guidance and samplers and writes eval.json and a plot."""
    out = tmp_path / "eval.json"
    cli(["evaluate", "--run", str(reference_run), "--out", str(out), "--prompts-per-kind", "2",
         "--images-per-prompt", "1", "--guidance", "1,3", "--steps", "3", "--samplers", "ddim2,ddim4",
         "--sweep-prompts", "2", "--reconstruction-images", "16", "--classifier-scales", "0,2",
         "--final-images", "3", "--same-noise", "1"])
    report = json.loads(out.read_text())
    assert [r["guidance_scale"] for r in report["guidance_sweep"]] == [1.0, 3.0]
    best = report["best_guidance_scale"]
    assert report["final"]["guidance_scale"] == best and report["final"]["images_per_prompt"] == 1
    for kind in ("single", "two", "held_out"):  # fresh prompts, one image each, every share with its interval
        final = report["final"]["fidelity"][kind]
        assert final["n"] == 3 and final["all_correct_ci"][0] <= final["all_correct"] <= final["all_correct_ci"][1]
    assert report["same_noise_position"]["n"] == 9 and report["same_noise_position"]["guidance_scale"] == best
    for flag in ("--final-images", "--same-noise"):  # a negative count fails at once, nothing written
        bad = tmp_path / "bad.json"
        with pytest.raises(SystemExit, match=f"{flag} must be >= 0"):
            cli(["evaluate", "--run", str(reference_run), "--out", str(bad), flag, "-1"])
        assert not bad.exists()
    assert [r["steps"] for r in report["sampler_sweep"]] == [2, 4]
    for kind in ("single", "two", "held_out"):
        assert 0 <= report["guidance_sweep"][0]["fidelity"][kind]["all_correct"] <= 1
    assert report["reconstruction"]["psnr"] > 5
    methods = [(r["method"], r["classifier_scale"]) for r in report["guidance_methods"]]
    assert methods == [("unconditional", 0.0), ("cfg+classifier", 0.0), ("classifier", 2.0),
                       ("cfg+classifier", 2.0), ("conditional, no guidance", 0.0)]
    assert out.with_suffix(".png").stat().st_size > 1000


@pytest.mark.parametrize("preset", ["tiny", "cpu", "small"])
def test_component_configs_follow_the_train_config(preset):
    """component_configs maps each TrainConfig field to its component's config (the U-Net bench.py measures
    is this one), with GroupNorm groups min(32, width // 4) for every network."""
    cfg = train_small.parse_args(["--preset", preset])
    text_cfg, ae_cfg, unet_cfg, diffusion_cfg = train_small.component_configs(cfg, 77)
    assert (text_cfg.vocab_size, text_cfg.max_length, text_cfg.d_model) == (77, cfg.max_length, cfg.text_width)
    assert (text_cfg.n_layers, text_cfg.n_heads) == (cfg.text_layers, cfg.heads)
    assert (ae_cfg.base_channels, ae_cfg.channel_mult, ae_cfg.recon_loss) == (cfg.ae_channels, cfg.ae_mult, cfg.recon_loss)
    assert ae_cfg.num_groups == min(32, cfg.ae_channels // 4)
    assert (unet_cfg.in_channels, unet_cfg.out_channels) == (ae_cfg.z_channels, ae_cfg.z_channels)
    assert unet_cfg.model_channels == cfg.unet_channels and unet_cfg.channel_mult == tuple(cfg.unet_mult)
    assert unet_cfg.attention_levels == tuple(cfg.unet_attention) and unet_cfg.num_heads == cfg.heads
    assert unet_cfg.num_res_blocks == cfg.unet_res_blocks and unet_cfg.context_dim == cfg.text_width
    assert unet_cfg.num_groups == min(32, cfg.unet_channels // 4)
    assert (unet_cfg.pooled_context, unet_cfg.coord_channels, unet_cfg.scale_shift) == (
        cfg.pooled_context, cfg.coord_channels, cfg.scale_shift)
    assert (diffusion_cfg.schedule, diffusion_cfg.prediction, diffusion_cfg.p_uncond) == (
        cfg.schedule, cfg.prediction, cfg.p_uncond)
    assert train_small.num_groups(cfg.classifier_channels) == min(32, cfg.classifier_channels // 4)


def test_help_labels_each_default_truthfully(capsys):
    """--help gives the TrainConfig default of every field and each preset that changes it; nothing is
    labelled as a preset's value that no preset sets."""
    with pytest.raises(SystemExit):
        train_small.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    steps = {name: train_small.PRESETS[name]["steps"] for name in ("tiny", "small")}
    assert f"(default: {train_small.TrainConfig.steps}; tiny: {steps['tiny']}, small: {steps['small']})" in text
    assert "AdamW weight decay (default: 0.01)" in text         # no preset sets it
    assert "(default: 1,2; small: 1,2,2)" in text               # --ae-mult, as the flag takes it
    assert "cpu:" not in text and "L1 alone" not in text


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_shapes_settings_reach_the_dataset(share):
    """--two-object-prob and --p-position set the Shapes dataset that stage 0 builds."""
    cfg = train_small.parse_args(["--preset", "tiny", "--num-train", "64", "--num-val", "16",
                                  "--two-object-prob", str(share), "--p-position", "0"])
    train_set, val_set, _, _ = train_small.load_data(cfg, torch.device("cpu"))
    for ds in (train_set, val_set):
        assert ds.cfg.two_object_prob == share and ds.cfg.p_position == 0.0
        assert (ds.scenes.n_objects == (2 if share else 1)).all()
    if not share:  # one object each, and no caption names its position
        assert not any(m[0]["position"] for m in train_set.scenes.mentions)
