"""bench.py and benchmarks/: the whole bench runs in --tiny mode on the CPU and reports every figure.

No timing is asserted: only that each figure is there, is a number or None with a reason, and
the properties that do not depend on the machine (ratios, fused == written-out attention, equal
parameter counts against diffusers, the same DDIM step, activations that grow with the input).
The torch.compile figures of section 7 are skipped here (--no-compile): compiling takes minutes on a CPU.
"""

import argparse
import json
import math
from dataclasses import replace

import pytest
import torch

import bench
import train_small
from benchmarks.cpu_speed import NAMES as CPU_SPEED
from benchmarks.cpu_speed import group_of
from benchmarks.growth import read_fidelity
from benchmarks.versus_diffusers import NAMES

FIGURES = [
    # 1. latent vs pixel
    "latent_step_s", "latent_images_per_s", "latent_peak_memory_mib", "latent_activations_mib",
    "pixel_step_s", "pixel_images_per_s", "pixel_peak_memory_mib", "pixel_activations_mib", "pixel_over_latent",
    # 2. samplers
    "ddim50_s", "ddpm1000_s", "ddpm_over_ddim",
    # 3. attention
    "unet_written_attention_s", "unet_fused_attention_s", "fused_speedup", "attention_max_abs_diff",
    "attention_fn_written_ms", "attention_fn_fused_ms", "attention_fn_max_abs_diff",
    # 4. precision, compile, FLOPs
    "fp32_step_s", "bf16_step_s", "bf16_speedup", "compile_time_s", "compiled_step_s", "compile_speedup",
    "step_gflop", "achieved_tflops", "matmul_peak_tflops", "conv_peak_tflops", "mfu",
    # 5. diffusers
    *NAMES,
    # 6. growth
    *[f"growth_{size}px_f{f}_{kind}" for size in (16, 32) for f in (1, 2, 4) for kind in ("step_s", "activations_mib")],
    "mfu_batch_1x", "mfu_batch_2x", "mfu_batch_4x", "ddim2_sample_s", "ddim5_sample_s",
    # 7. cpu speed
    *[name for name, _ in CPU_SPEED],
]
CUDA_ONLY = ["latent_peak_memory_mib", "pixel_peak_memory_mib", "fp32_step_s", "bf16_step_s", "bf16_speedup",
             "compile_time_s", "compiled_step_s", "compile_speedup"]


def parse(argv):
    return bench.add_arguments(argparse.ArgumentParser()).parse_args(argv)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    torch.manual_seed(0)
    results = bench.run(parse(["--tiny", "--device", "cpu", "--no-compile", "--out", str(out)]))
    return results, out


def test_json_valid_and_every_figure_present(tiny_run):
    """The JSON file parses, equals the returned dict, and holds every figure as a number or None with a reason."""
    results, out = tiny_run
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(results, default=str))
    assert saved["device_type"] == "cpu" and saved["torch"] == torch.__version__
    assert saved["config"]["unet"]["in_channels"] == 4
    figures = saved["figures"]
    assert sorted(figures) == sorted(FIGURES)
    for name, fig in figures.items():
        assert {"value", "unit", "note"} <= set(fig), name
        if fig["value"] is None:
            assert fig["note"].strip(), f"{name} is None without a reason"
        else:
            assert isinstance(fig["value"], (int, float)) and math.isfinite(fig["value"]), name


def test_cuda_only_figures_are_none_on_cpu(tiny_run):
    """On a CPU, the CUDA-only figures are None and say 'cuda only'; the CPU ones are measured."""
    figures = tiny_run[0]["figures"]
    for name in CUDA_ONLY:
        assert figures[name]["value"] is None and "cuda only" in figures[name]["note"], name
    for name in ("latent_step_s", "pixel_step_s", "ddim50_s", "ddpm1000_s", "step_gflop", "mfu"):
        assert figures[name]["value"] is not None and figures[name]["value"] > 0, name


def test_diffusers_recorded_either_way(tiny_run):
    """Without diffusers every section-5 figure is None and says how to install it; with it, the U-Net and
    the autoencoder have exactly tinyldm's parameter count (the same architecture), and a whole DDIM loop of
    each library's step from the same x_T and U-Net agrees to float precision (the same maths)."""
    results = tiny_run[0]
    figures = results["figures"]
    try:
        import diffusers
    except ImportError:
        assert results["diffusers"] is None
        for name in NAMES:
            assert figures[name]["value"] is None and "requirements-bench.txt" in figures[name]["note"], name
        return
    assert results["diffusers"] == diffusers.__version__
    assert figures["unet_params_diffusers_m"]["value"] == figures["unet_params_tinyldm_m"]["value"] > 0
    assert figures["ae_params_diffusers_m"]["value"] == figures["ae_params_tinyldm_m"]["value"] > 0
    assert figures["ddim_loop_max_rel_diff"]["value"] < 1e-5


def test_growth_activations_follow_the_input(tiny_run):
    """At one batch, the bytes kept for backward grow with the positions the U-Net sees: for one image size
    they fall as f grows (f² fewer positions), and for one f they rise with the image size."""
    figures = tiny_run[0]["figures"]

    def mib(size, f):
        return figures[f"growth_{size}px_f{f}_activations_mib"]["value"]

    for size in (16, 32):
        assert mib(size, 1) > mib(size, 2) > mib(size, 4) > 0
    for f in (1, 2, 4):
        assert mib(32, f) > mib(16, f)
    assert mib(32, 2) == pytest.approx(mib(16, 1), rel=0.35)  # both 16x16 positions (3 vs 4 input channels)


def test_mfu_counts_flops_linear_in_batch(tiny_run):
    """FlopCounterMode's count per step doubles with the batch (no timing is checked)."""
    figures = tiny_run[0]["figures"]
    one, two, four = (figures[f"mfu_batch_{k}x"] for k in (1, 2, 4))
    assert two["batch"] == 2 * one["batch"] and four["batch"] == 4 * one["batch"]
    assert two["gflop"] == pytest.approx(2 * one["gflop"], rel=1e-6)
    assert four["gflop"] == pytest.approx(4 * one["gflop"], rel=1e-6)


class Event:  # what group_of reads of a torch.profiler event: its name and the op it runs inside
    def __init__(self, name, parent=None):
        self.name, self.cpu_parent = name, parent


def test_cpu_profile_groups_ops_by_what_they_run_inside(tiny_run):
    """An op counts in its own group, else in that of the nearest op it runs inside (AdamW's aten::sqrt is
    optimizer time), else in "other"; in the tiny run every group's share is in [0, 1] and compile is skipped."""
    step = Event("Optimizer.step#AdamW.step")
    assert group_of(Event("aten::sqrt", Event("aten::_foreach_sqrt", step))) == "optimizer"
    assert group_of(Event("aten::convolution_backward")) == "convolution"
    assert group_of(Event("aten::native_group_norm")) == "normalisation"
    assert group_of(Event("aten::_scaled_dot_product_flash_attention_for_cpu")) == "attention"
    assert group_of(Event("aten::addmm", Event("aten::linear"))) == "matmul"
    assert group_of(Event("aten::mul", Event("aten::silu"))) == "other"
    figures = tiny_run[0]["figures"]
    shares = {name: fig["value"] for name, fig in figures.items() if name.startswith("profile_") and name.endswith("_share")}
    assert len(shares) == 6 and sum(shares.values()) == pytest.approx(1)  # every op in exactly one group
    assert shares["profile_convolution_share"] > 0 and shares["profile_optimizer_share"] > 0  # the groups match real ops
    assert figures["compile_cpu_speedup"]["value"] is None and "--no-compile" in figures["compile_cpu_speedup"]["note"]


def test_plot_written_beside_the_json(tiny_run):
    """bench.png goes beside bench.json and is a PNG."""
    png = tiny_run[1].with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fidelity_goes_beside_the_sampling_times(tmp_path):
    """With --fidelity, each DDIM figure of section 6 carries the fidelity evaluate measured at its step count
    (and only those steps), and the plot draws it (sections 1 and 6 only)."""
    single = {"all_correct": 0.625, "all_correct_ci": [0.5, 0.75], "all_correct_n": 40}
    fidelity = tmp_path / "eval.json"
    fidelity.write_text(json.dumps({"sampler_sweep": [{"sampler": "ddim", "steps": 5, "fidelity": {"single": single}}]}))
    out = tmp_path / "b.json"
    results = bench.run(parse(["--tiny", "--device", "cpu", "--sections", "6", "--fidelity", str(fidelity),
                               "--out", str(out)]))
    assert results["sections"] == ["1", "6"]
    five, two = results["figures"]["ddim5_sample_s"], results["figures"]["ddim2_sample_s"]
    assert (five["fidelity"], five["fidelity_ci"], five["fidelity_n"]) == (0.625, [0.5, 0.75], 40)
    assert "fidelity" not in two
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_fidelity_read_from_an_evaluate_sampler_sweep(tmp_path):
    """read_fidelity keeps the DDIM entries of an evaluate JSON's sampler sweep, by steps, and skips DDPM."""
    def entry(sampler, steps, share):
        single = {"all_correct": share, "all_correct_ci": [share - 0.1, share + 0.05], "all_correct_n": 48}
        return {"sampler": sampler, "steps": steps, "fidelity": {"single": single}}

    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"sampler_sweep": [entry("ddim", 10, 0.5), entry("ddim", 50, 0.75),
                                                  entry("ddpm", 1000, 0.8)]}))
    assert read_fidelity(path) == {10: (0.5, [0.4, 0.55], 48), 50: (0.75, [0.65, 0.8], 48)}


def test_latent_over_pixel_ratio(tiny_run):
    """Pixels (f² more positions) save more activations for backward than latents do: more than f²/2
    times as much."""
    figures, f = tiny_run[0]["figures"], tiny_run[0]["config"]["f"]
    assert f >= 2 and figures["pixel_activations_mib"]["value"] > f * f / 2 * figures["latent_activations_mib"]["value"]


def test_fused_attention_matches_written_out(tiny_run):
    """Transformer Eq. 1 two ways: fused SDPA and softmax(QKᵀ/√d)V give the same U-Net output (< 1e-4),
    on a U-Net whose output is not the trivial 0 of the zero-initialised layers."""
    figures = tiny_run[0]["figures"]
    assert figures["attention_max_abs_diff"]["value"] < 1e-4
    assert figures["attention_max_abs_diff"]["output_max_abs"] > 1e-2
    assert figures["attention_fn_max_abs_diff"]["value"] < 1e-4


def test_ddpm_extrapolation_is_labelled(tiny_run):
    """--tiny runs DDPM over a short schedule; the figure says EXTRAPOLATED."""
    figures = tiny_run[0]["figures"]
    assert "EXTRAPOLATED" in figures["ddpm1000_s"]["note"]


@pytest.mark.parametrize("preset", ["tiny", "cpu", "small"])
def test_bench_measures_the_presets_own_unet(preset):
    """The measured U-Net is the one train_small.component_configs builds for the preset (what it maps is
    tested in test_train.py), with the channels of the space measured: 4 for latents, 3 for pixels."""
    train_cfg = bench.preset_config(preset)
    assert train_cfg == train_small.parse_args(["--preset", preset])
    _, _, unet_cfg, _ = train_small.component_configs(train_cfg, train_cfg.vocab_size)
    assert bench.unet_config(train_cfg, 4) == unet_cfg and unet_cfg.in_channels == 4
    cfg = bench.unet_config(train_cfg, 3)
    assert (cfg.in_channels, cfg.out_channels) == (3, 3)
    assert cfg == replace(unet_cfg, in_channels=3, out_channels=3)


def test_none_means_the_device_and_preset_defaults():
    """BenchConfig's None fields are filled in from the preset and the device; an explicit 0 is no
    'auto' but an error."""
    bc = bench.BenchConfig(device="cpu")
    device, train_cfg, _ = bench.resolve(bc)
    assert device.type == "cpu" and bc.preset == "cpu"
    assert (bc.image_size, bc.batch_size) == (train_cfg.image_size, train_cfg.batch_size) == (32, 64)
    assert (bc.sample_batch, bc.warmup, bc.repeats) == (16, 1, 7)
    bc = bench.BenchConfig(device="cpu", preset="small", batch_size=8)
    bench.resolve(bc)
    assert (bc.image_size, bc.batch_size) == (64, 8)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        bench.resolve(bench.BenchConfig(device="cpu", batch_size=0))


def test_bad_options_raise_clear_errors(tmp_path):
    """Unknown preset, an image size the U-Net cannot halve, and cuda without a GPU are ValueErrors."""
    out = str(tmp_path / "b.json")
    with pytest.raises(ValueError, match="preset"):
        bench.run(parse(["--device", "cpu", "--preset", "huge", "--out", out]))
    with pytest.raises(ValueError, match="image_size"):
        bench.run(parse(["--tiny", "--device", "cpu", "--image-size", "20", "--out", out]))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda"):
            bench.run(parse(["--device", "cuda", "--out", out]))
    with pytest.raises(ValueError, match="sections"):
        bench.run(parse(["--tiny", "--device", "cpu", "--sections", "1,9", "--out", out]))
    with pytest.raises(ValueError, match="no such folder"):
        bench.run(parse(["--tiny", "--device", "cpu", "--out", str(tmp_path / "missing" / "b.json")]))
    with pytest.raises(ValueError, match="fidelity"):
        bench.run(parse(["--tiny", "--device", "cpu", "--fidelity", str(tmp_path / "none.json"), "--out", out]))
    assert not list(tmp_path.iterdir())  # every error came before anything was written
