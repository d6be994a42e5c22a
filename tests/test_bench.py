"""bench.py: the whole bench runs in --tiny mode on the CPU and reports every figure.

No timing is asserted: only that each figure is there, is a number or None with a reason, and
the properties that do not depend on the machine (ratios, fused == written-out attention).
"""

import argparse
import json
import math
from dataclasses import replace

import pytest
import torch

import bench
import train_small

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
    "step_gflop", "achieved_tflops", "matmul_peak_tflops", "mfu",
    # 5. diffusers
    "diffusers_step_s", "diffusers_over_tinyldm", "diffusers_params_m",
]
CUDA_ONLY = ["latent_peak_memory_mib", "pixel_peak_memory_mib", "fp32_step_s", "bf16_step_s", "bf16_speedup",
             "compile_time_s", "compiled_step_s", "compile_speedup"]


def parse(argv):
    return bench.add_arguments(argparse.ArgumentParser()).parse_args(argv)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    torch.manual_seed(0)
    results = bench.run(parse(["--tiny", "--device", "cpu", "--out", str(out)]))
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
    """Without diffusers the comparison says so; with it, its step time is measured."""
    results = tiny_run[0]
    try:
        import diffusers  # noqa: F401
    except ImportError:
        assert results["comparison"] == {"diffusers": None, "reason": "diffusers not installed"}
        assert results["figures"]["diffusers_step_s"]["value"] is None
    else:
        assert results["comparison"]["diffusers"] is not None


def test_latent_over_pixel_ratio(tiny_run):
    """pixel_over_latent = pixel step time / latent step time > 0, and pixels (f² more positions)
    save more activations for backward than latents do: more than f²/2 times as much."""
    figures, f = tiny_run[0]["figures"], tiny_run[0]["config"]["f"]
    ratio = figures["pixel_over_latent"]["value"]
    assert ratio > 0
    assert ratio == pytest.approx(figures["pixel_step_s"]["value"] / figures["latent_step_s"]["value"], rel=1e-9)
    assert f >= 2 and figures["pixel_activations_mib"]["value"] > f * f / 2 * figures["latent_activations_mib"]["value"]


def test_fused_attention_matches_written_out(tiny_run):
    """Transformer Eq. 1 two ways: fused SDPA and softmax(QKᵀ/√d)V give the same U-Net output (< 1e-4),
    on a U-Net whose output is not the trivial 0 of the zero-initialised layers."""
    figures = tiny_run[0]["figures"]
    assert figures["attention_max_abs_diff"]["value"] < 1e-4
    assert figures["attention_max_abs_diff"]["output_max_abs"] > 1e-2
    assert figures["attention_fn_max_abs_diff"]["value"] < 1e-4


def test_ddpm_extrapolation_is_labelled(tiny_run):
    """--tiny runs DDPM over a short schedule; the figure says EXTRAPOLATED and DDPM-1000 costs more than DDIM-50."""
    figures = tiny_run[0]["figures"]
    assert "EXTRAPOLATED" in figures["ddpm1000_s"]["note"]
    assert figures["ddpm_over_ddim"]["value"] > 1


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
    assert (bc.sample_batch, bc.warmup, bc.repeats) == (16, 1, 3)
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
