"""Command line: `python -m tinyldm COMMAND ...` (`python -m tinyldm --help` lists them)."""

import argparse
import math
import sys
import tempfile
from pathlib import Path

# the guidance scales the commands accept: s = 1 is no guidance, 0 the unconditional model, and useful
# scales are a few units; 100 leaves room to explore, while 1e30 or inf only gives saturated or NaN images
GUIDANCE_RANGE = (0.0, 100.0)


def show_data(args):
    """Save a grid of Shapes images with their captions (the README's data figure)."""
    from tinyldm.data import ShapesConfig, ShapesDataset

    for name in ("rows", "cols", "dpi"):
        _check_at_least(args, name, 1)
    _check_at_least(args, "image_size", 16)
    _check_out("--out", args.out, (".png",))
    ds = ShapesDataset(ShapesConfig(image_size=args.image_size, num_train=args.rows * args.cols,
                                    seed=args.seed), "train")
    titles = []
    for caption in ds.captions:  # wrap each caption at ~24 characters
        lines = [""]
        for w in caption.split():
            lines[-1:] = [lines[-1] + " " + w] if len(lines[-1]) + len(w) < 24 else [lines[-1], w]
        titles.append("\n".join(line.strip() for line in lines))
    save_grid(ds.images_uint8(), titles, args.out, cols=args.cols, cell=(2.2, 2.8), fontsize=7, dpi=args.dpi)
    print(f"wrote {args.out}")


def sample(args):
    """Generate images for prompts from a trained run folder and save them as one PNG grid."""
    import torch

    from tinyldm.data import to_uint8

    target = _check_sample_args(args)  # every argument and the output path, before the run is loaded
    model, device = _load_run(args)
    prompts = [p for p in args.prompts for _ in range(args.num_images)]
    generator = torch.Generator(device).manual_seed(args.seed)
    guide = {}
    if args.classifier_scale:
        from tinyldm.classifier import make_classifier_grad

        classifier = _load_classifier(args, device)
        if classifier is None:
            raise SystemExit(f"error: --classifier-scale needs a run with a classifier; {args.run} has none "
                             "(train_small.py trains one on Shapes unless --classifier-steps 0)")
        guide = dict(classifier_scale=args.classifier_scale, classifier_grad=make_classifier_grad(classifier, target))
    with autocast(device):
        try:
            images = model.generate(prompts, steps=args.steps, guidance_scale=args.guidance_scale,
                                    sampler=args.sampler, eta=args.eta, generator=generator, progress=True, **guide)
        except ValueError as e:
            raise SystemExit(f"error: {e}")
    grid = to_uint8(images).view(len(args.prompts), args.num_images, 3, *images.shape[-2:])
    _save_grid(grid, args.prompts, args.out)
    print(f"wrote {args.out}")


def edit(args):
    """img2img and inpaint: edit one PNG with a prompt and a trained run; the results side by side in one PNG."""
    import numpy as np
    import torch
    from PIL import Image

    from tinyldm.data import to_float, to_uint8

    _check_edit_args(args)  # every argument, the input files and the output path, before the run is loaded
    image = _read_png("--image", args.image, "RGB")                        # (H, W, 3) uint8
    mask = None
    if args.command == "inpaint":
        mask = _read_png("--mask", args.mask, "L")                         # (H, W) uint8
        if mask.shape != image.shape[:2]:
            raise SystemExit(f"error: --mask {args.mask} is {mask.shape[1]}×{mask.shape[0]} pixels, the image "
                             f"{image.shape[1]}×{image.shape[0]}")
        if not np.isin(mask, (0, 255)).all():
            raise SystemExit(f"error: --mask {args.mask} is not binary: every pixel must be black (0, keep) or "
                             "white (255, repaint)")
    model, device = _load_run(args)
    S = model.image_size
    if image.shape[:2] != (S, S):
        raise SystemExit(f"error: --image {args.image} is {image.shape[1]}×{image.shape[0]} pixels; this run's model "
                         f"works at {S}×{S} (resize it first)")
    x = to_float(torch.from_numpy(image).permute(2, 0, 1))[None].repeat(args.num_images, 1, 1, 1)  # (N, 3, S, S)
    generator = torch.Generator(device).manual_seed(args.seed)
    common = dict(steps=args.steps, guidance_scale=args.guidance_scale, eta=args.eta, generator=generator,
                  progress=True)
    with autocast(device):
        try:
            if mask is None:
                images = model.img2img(x.to(device), args.prompt, strength=args.strength, **common)
            else:
                masks = torch.from_numpy(mask == 255)[None].repeat(args.num_images, 1, 1)  # (N, S, S) bool
                images = model.inpaint(x.to(device), masks.to(device), args.prompt, resample=args.resample, **common)
        except ValueError as e:
            raise SystemExit(f"error: {e}")
    strip = to_uint8(images).permute(2, 0, 3, 1).reshape(S, -1, 3)       # (S, N·S, 3): the N results in a row
    Image.fromarray(strip.cpu().numpy()).save(args.out)
    print(f"wrote {args.out}")


def _check_edit_args(args):
    """Exit with a one-line error for any bad argument of img2img or inpaint."""
    _check_text("the prompt", args.prompt)
    _check_at_least(args, "num_images", 1)
    _check_at_least(args, "steps", 1)
    _check_guidance_scale("--guidance-scale", args.guidance_scale)
    if not 0 <= args.eta <= 1:
        raise SystemExit(f"error: --eta must be in [0, 1] (0 deterministic DDIM, 1 DDPM-like), got {args.eta}")
    if args.command == "img2img" and not 0 < args.strength <= 1:  # also refuses nan
        raise SystemExit(f"error: --strength must be in (0, 1] (small keeps the image, 1 forgets it), got {args.strength}")
    if args.command == "inpaint":
        _check_at_least(args, "resample", 1, " (1 = no resampling)")
    _check_out("--out", args.out, (".png",))


def _read_png(flag, path, mode):
    """An image file as a uint8 array, (H, W, 3) for mode "RGB" or (H, W) for "L"; a one-line error otherwise."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise SystemExit(f"error: {flag} {path}: no such file")
    try:
        with Image.open(path) as im:
            return np.array(im.convert(mode), dtype=np.uint8)  # a copy: torch wants a writable array
    except (UnidentifiedImageError, OSError) as e:
        raise SystemExit(f"error: {flag} {path}: not a readable image ({e})")


def _check_sample_args(args):
    """Exit with a one-line error for any bad argument of `sample`; the classifier target (None without
    classifier guidance) parsed, so that nothing fails after minutes of sampling."""
    for i, prompt in enumerate(args.prompts):
        _check_text(f"prompt {i + 1}", prompt)
    _check_text("--target", args.target)
    _check_at_least(args, "num_images", 1)
    _check_at_least(args, "steps", 1)
    _check_guidance_scale("--guidance-scale", args.guidance_scale)
    if not 0 <= args.eta <= 1:  # also refuses nan: every comparison with nan is False
        raise SystemExit(f"error: --eta must be in [0, 1] (0 deterministic DDIM, 1 DDPM-like), got {args.eta}")
    if not math.isfinite(args.classifier_scale) or args.classifier_scale < 0:
        raise SystemExit(f"error: --classifier-scale must be a finite number >= 0 (0 = off), got {args.classifier_scale}")
    _check_out("--out", args.out, (".png",))
    if not args.classifier_scale:
        if args.target:  # a target without a scale would be silently ignored
            raise SystemExit(f"error: --target {args.target!r} needs --classifier-scale γ > 0 to guide towards it")
        return None
    if not args.target:  # a scale without a target guides towards nothing
        raise SystemExit("error: --classifier-scale needs --target, the attributes to guide towards "
                         "(e.g. --target colour=red,shape=circle)")
    from tinyldm.classifier import classifier_targets

    try:
        return classifier_targets(dict(pair.split("=", 1) for pair in args.target.split(",") if pair))
    except ValueError as e:
        raise SystemExit(f"error: --target {args.target!r}: {e} (e.g. --target colour=red,shape=circle)")


def _check_at_least(args, name, low, note=""):
    """Exit with "--flag must be >= low" unless args.name >= low."""
    value = getattr(args, name)
    if value < low:
        raise SystemExit(f"error: --{name.replace('_', '-')} must be >= {low}{note}, got {value}")


def _check_guidance_scale(flag, value):
    low, high = GUIDANCE_RANGE
    if not low <= value <= high:  # nan and inf included: they make all-black images
        raise SystemExit(f"error: {flag} must be a number in [{low:g}, {high:g}] (1 = no guidance), got {value}")


def _check_text(what, text):
    """Text from the command line is UTF-8; bytes that are not arrive as lone surrogates (surrogateescape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise SystemExit(f"error: {what} {text!r} is not valid UTF-8 text; check the terminal's encoding")


def _check_out(flag, path, suffixes):
    """Exit unless `path` ends in one of `suffixes` and its folder exists and takes a new file: checked
    before any work, so that a typo in the path never costs the results."""
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise SystemExit(f"error: {flag} {path}: the file name must end in {' or '.join(suffixes)}")
    folder = path.parent
    if not folder.is_dir():
        raise SystemExit(f"error: {flag} {path}: the folder {folder} does not exist")
    if path.is_dir():
        raise SystemExit(f"error: {flag} {path} is a folder; give a file name")
    try:  # the one sure test of a folder (permissions, read-only mounts, network file systems) is a write
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise SystemExit(f"error: {flag} {path}: cannot write into {folder} ({e.strerror})")


def save_grid(images, titles, path, cols, cell=(1.9, 2.1), fontsize=6, dpi=90):
    """uint8 images (N, 3, H, W), one title each, in rows of `cols` -> PNG; `cell` is each image's
    (width, height) in inches. show_data and train_small.py's grids use it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = math.ceil(len(images) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cell[0] * cols, cell[1] * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, images, titles):
        ax.imshow(image.permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
        ax.set_title(title, fontsize=fontsize, parse_math=False)  # a caption's "$" is text, not TeX
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def _save_grid(grid, row_titles, path):
    """grid (rows, cols, 3, H, W) uint8 -> PNG, one prompt per row. (Not save_grid: this labels each row
    with the prompt all its images share, where save_grid titles every image.)"""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = grid.shape[:2]
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols + 2.5, 1.35 * rows), squeeze=False)
    for r in range(rows):
        for c in range(cols):
            axes[r, c].imshow(grid[r, c].permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
        axes[r, 0].set_ylabel(row_titles[r], rotation=0, ha="right", va="center", fontsize=8,
                              parse_math=False)  # a prompt's "$" is text, not TeX
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def pick_device(name="auto", local_rank=0):
    """"auto" -> this process's GPU (cuda:local_rank) if there is one, else the CPU; any other name as given.
    The one device rule of the project: train_small.py, bench.py and these commands use it."""
    import torch

    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name} was asked for, but torch.cuda.is_available() is False")
    return device


def _load_run(args):
    """The trained model of --run on --device, or a one-line error for a missing, incomplete or broken run."""
    from tinyldm.ldm import LatentDiffusion, RunFolderError

    device = pick_device(args.device)
    try:
        return LatentDiffusion.load(args.run, map_location=device).to(device), device
    except (FileNotFoundError, RunFolderError) as e:
        raise SystemExit(f"error: {e}")


def _load_classifier(args, device):
    """The run's noise-aware latent classifier on `device`, or None when it has none."""
    from tinyldm.classifier import load_classifier
    from tinyldm.ldm import RunFolderError

    try:
        classifier = load_classifier(args.run, map_location=device)
    except (FileNotFoundError, RunFolderError) as e:
        raise SystemExit(f"error: {e}")
    return None if classifier is None else classifier.to(device)


def autocast(device, enabled=True):
    """bf16 autocast on CUDA (about 2x the fp32 speed, same accuracy here); nothing on a CPU or when not
    enabled. The one precision rule of the project: train_small.py, bench.py and these commands use it."""
    from contextlib import nullcontext

    import torch

    return torch.autocast("cuda", dtype=torch.bfloat16) if enabled and device.type == "cuda" else nullcontext()


def evaluate(args):
    """Caption fidelity over guidance scales and samplers, the same-noise position test, reconstruction
    quality (the protocol is tinyldm/evaluate.py's, step by step); eval.json + eval.png. Every share is
    printed and saved with its 95 % Wilson interval."""
    import json

    from tinyldm.evaluate import (PROMPT_KINDS, best_guidance_scale, classifier_sweep, edit_tests, final_fidelity,
                                  guidance_sweep, prompt_set, reconstruction, same_noise_test, sampler_sweep)

    _check_evaluate_args(args)  # before minutes of sampling, not after
    if args.out:
        _check_out("--out", args.out, (".json",))
    model, device = _load_run(args)
    out = Path(args.out or Path(args.run) / "eval.json")
    if not args.out:  # the run folder exists now; can it take eval.json?
        _check_out("--out", out, (".json",))
    classifier = _load_classifier(args, device) if args.classifier_scales else None
    prompts = {kind: prompt_set(kind, args.prompts_per_kind, seed=args.seed) for kind in PROMPT_KINDS}
    report = {"run": str(args.run), "device": str(device), "prompts_per_kind": args.prompts_per_kind,
              "images_per_prompt": args.images_per_prompt}
    seed, batch_size = args.seed, args.batch_size  # every run draws its noise from seed, in batches
    with autocast(device):
        report["reconstruction"] = reconstruction(model, args.reconstruction_images)
        everything = [pt for kind in PROMPT_KINDS for pt in prompts[kind]]
        report["guidance_sweep"] = guidance_sweep(model, everything, args.guidance, args.images_per_prompt, args.steps,
                                                  seed=seed, batch_size=batch_size)
        best = best_guidance_scale(report["guidance_sweep"])
        report["best_guidance_scale"] = best
        if args.final_images:
            report["final"] = final_fidelity(model, args.final_images, best, args.steps, seed=seed,
                                             batch_size=batch_size)
        report["same_noise_position"] = None
        if args.same_noise:
            report["same_noise_position"] = same_noise_test(model, args.same_noise, best, args.steps, seed=seed,
                                                            batch_size=batch_size)
        # on single-object prompts: fewer of them for the samplers (DDPM takes all T steps); the classifier's labels
        report["sampler_sweep"] = sampler_sweep(model, prompts["single"][: args.sweep_prompts], args.samplers, best,
                                                args.images_per_prompt, seed=seed, batch_size=batch_size)
        report["guidance_methods"] = []
        if args.classifier_scales and classifier is not None:
            report["guidance_methods"] = classifier_sweep(model, classifier, prompts["single"], args.classifier_scales, best,
                                                          args.images_per_prompt, args.steps, seed=seed,
                                                          batch_size=batch_size)
        if args.edits:  # off by default: editing is measured only when asked for
            report["edits"] = edit_tests(model, args.edits, args.edit_strengths, best, args.steps, seed=seed,
                                         batch_size=batch_size)
    out.write_text(json.dumps(report, indent=2))
    _plot_eval(report, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def _check_evaluate_args(args):
    """Exit with a one-line error for any bad count, scale or sampler name of `evaluate`."""
    from tinyldm.evaluate import parse_sampler

    for name in ("final_images", "same_noise", "edits"):
        _check_at_least(args, name, 0, " (0 = skip)")
    if args.edits and not args.edit_strengths:
        raise SystemExit("error: --edits needs at least one strength in --edit-strengths, e.g. 0.5,0.8")
    for s in args.edit_strengths:
        if not 0 < s <= 1:
            raise SystemExit(f"error: --edit-strengths must be numbers in (0, 1], got {s}")
    for name in ("prompts_per_kind", "images_per_prompt", "steps", "reconstruction_images", "batch_size"):
        _check_at_least(args, name, 1)
    if args.samplers:
        _check_at_least(args, "sweep_prompts", 1, " (or --samplers '' to skip the sampler sweep)")
    if not args.guidance:
        raise SystemExit("error: --guidance needs at least one scale, e.g. --guidance 1,3")
    for s in args.guidance:
        _check_guidance_scale("--guidance", s)
    for gamma in args.classifier_scales:
        if not math.isfinite(gamma) or gamma < 0:
            raise SystemExit(f"error: --classifier-scales must be finite numbers >= 0, got {gamma}")
    for name in args.samplers:
        try:
            parse_sampler(name)
        except ValueError as e:
            raise SystemExit(f"error: --samplers: {e}")


def _plot_eval(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edits = report.get("edits")
    panels = 1 + bool(report["sampler_sweep"]) + bool(report["guidance_methods"]) + bool(edits)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.6), squeeze=False)
    panel = iter(axes.flat)  # left to right: guidance sweep, samplers, classifier guidance, edits (those present)
    ax = next(panel)
    sweep = report["guidance_sweep"]
    for dodge, kind in zip((-0.04, 0.0, 0.04), ("single", "two", "held_out")):  # dodge: bars side by side
        y = [r["fidelity"][kind]["all_correct"] for r in sweep]
        lo, hi = zip(*(r["fidelity"][kind]["all_correct_ci"] for r in sweep))
        yerr = [[v - a for v, a in zip(y, lo)], [b - v for v, b in zip(y, hi)]]  # below, above
        ax.errorbar([r["guidance_scale"] + dodge for r in sweep], y, yerr=yerr, fmt="o-", capsize=3, label=kind)
    if report.get("final"):  # the headline figures: fresh prompts at the best scale, drawn as squares
        final = report["final"]
        for dodge, kind in zip((-0.04, 0.0, 0.04), ("single", "two", "held_out")):
            f = final["fidelity"][kind]
            lo, hi = f["all_correct_ci"]
            ax.errorbar([final["guidance_scale"] + dodge], [f["all_correct"]], capsize=3, fmt="ks", ms=4,
                             yerr=[[f["all_correct"] - lo], [hi - f["all_correct"]]],
                             label=f"final, n={f['n']} per kind" if kind == "single" else None)
    ax.set(xlabel="guidance scale s", ylabel="all mentioned attributes right", ylim=(0, 1.02),
                title="fidelity vs classifier-free guidance (DDIM)\nbars: 95 % Wilson intervals")
    ax.legend()
    if report["sampler_sweep"]:
        ddim = [r for r in report["sampler_sweep"] if r["sampler"] == "ddim"]
        ax = next(panel)
        ax.plot([r["steps"] for r in ddim], [r["fidelity"]["single"]["all_correct"] for r in ddim], "o-", label="DDIM")
        for r in report["sampler_sweep"]:
            if r["sampler"] == "ddpm":
                ax.axhline(r["fidelity"]["single"]["all_correct"], color="k", ls="--", label=f"DDPM {r['steps']} steps")
        ax.set(xscale="log" if ddim else "linear", xlabel="sampling steps", ylim=(0, 1.02),  # DDPM alone: no x data
               title=f"single-object fidelity vs steps (s = {report['best_guidance_scale']:g})")
        ax.legend()
    if report["guidance_methods"]:
        ax = next(panel)
        methods = report["guidance_methods"]
        for name, label in (("classifier", "unconditional + classifier γ"), ("cfg+classifier", "CFG + classifier γ")):
            rows = [r for r in methods if r["method"] == name or (name == "classifier" and r["method"] == "unconditional")]
            ax.plot([r["classifier_scale"] for r in rows], [r["fidelity"]["single"]["all_correct"] for r in rows],
                    "o-", label=label)
        for r in methods:
            if r["method"] == "conditional, no guidance":
                ax.axhline(r["fidelity"]["single"]["all_correct"], color="k", ls="--", label="prompt, no guidance")
        ax.set(xscale="symlog", xlabel="classifier scale γ", ylim=(0, 1.02),
               title="classifier guidance vs CFG (single objects)")
        ax.legend(fontsize=8)
    if edits:  # img2img recolouring against the strength, and the inpainting shares as dashed lines
        ax, rows = next(panel), edits["recolour"]["by_strength"]
        for key, label in (("edited", "img2img: recoloured and kept"), ("recoloured", "img2img: asked colour"),
                           ("kept", "img2img: shape, size, position kept")):
            y = [r[key] for r in rows]
            yerr = [[v - r[key + "_ci"][0] for v, r in zip(y, rows)], [r[key + "_ci"][1] - v for v, r in zip(y, rows)]]
            ax.errorbar([r["strength"] for r in rows], y, yerr=yerr, fmt="o-", capsize=3, label=label)
        inpaint = edits["inpaint"]
        ax.axhline(inpaint["recoloured"], color="k", ls="--", label="inpaint: masked object as asked")
        ax.axhline(inpaint["other_kept"], color="grey", ls=":", label="inpaint: other object kept")
        ax.set(xlabel="img2img strength s", ylim=(0, 1.02),
               title=f"editing, n = {edits['recolour']['n']} each (s = {edits['recolour']['guidance_scale']:g})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _numbers(text):
    """"1,2.5,3" -> [1.0, 2.5, 3.0] ("" -> []), or argparse's usage error that says what is accepted."""
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, e.g. 1,3,5; got {text!r}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tinyldm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("data", help="save a grid of Shapes images with their captions")
    p.add_argument("--out", default="shapes.png", help="output PNG path")
    p.add_argument("--image-size", type=int, default=64, help="pixels per side")
    p.add_argument("--rows", type=int, default=3)
    p.add_argument("--cols", type=int, default=6)
    p.add_argument("--seed", type=int, default=0, help="dataset seed")
    p.add_argument("--dpi", type=int, default=80)
    p.set_defaults(run_command=show_data)

    p = commands.add_parser("sample", help="generate images from prompts with a trained run")
    p.add_argument("prompts", nargs="+", help='one or more prompts, e.g. "a large red circle at the top left"')
    p.add_argument("--run", required=True, help="run folder written by train_small.py (runs/NAME)")
    p.add_argument("--out", default="samples.png", help="output PNG (one row per prompt); its folder must exist")
    p.add_argument("--num-images", type=int, default=4, help="images per prompt")
    p.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (DDPM always takes all T)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM η in [0, 1]: 0 deterministic, 1 DDPM-like noise")
    p.add_argument("--guidance-scale", type=float, default=3.0, help="classifier-free guidance scale s in [0, 100] (1 = off, 0 = unconditional)")
    p.add_argument("--classifier-scale", type=float, default=0.0,
                   help="classifier guidance scale γ towards --target (0 = off; use the prompt \"\" for the "
                        "unconditional model guided by the classifier alone)")
    p.add_argument("--target", default="", help="attributes for classifier guidance, e.g. colour=red,shape=circle,"
                                                  "size=large,position=top left")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.set_defaults(run_command=sample)

    for name, help_text in (("img2img", "edit an image with a prompt (SDEdit): noise it to --strength, then denoise"),
                            ("inpaint", "repaint the white region of --mask with a prompt, keep the rest (RePaint)")):
        p = commands.add_parser(name, help=help_text)
        p.add_argument("prompt", help='what the result should show, e.g. "a blue square"')
        p.add_argument("--run", required=True, help="run folder written by train_small.py (runs/NAME)")
        p.add_argument("--image", required=True, help="input PNG at the model's size (e.g. 32×32 for runs/cpu)")
        if name == "img2img":
            p.add_argument("--strength", type=float, default=0.6,
                           help="in (0, 1]: how far to noise the image (small keeps it, 1 forgets it)")
        else:
            p.add_argument("--mask", required=True, help="PNG of the image's size: white (255) repaint, black (0) keep")
            p.add_argument("--resample", type=int, default=1, help="RePaint resampling: runs per step (1 = none)")
        p.add_argument("--out", default=f"{name}.png", help="output PNG: the results side by side; its folder must exist")
        p.add_argument("--num-images", type=int, default=1, help="results, each from its own noise")
        p.add_argument("--steps", type=int, default=50, help="DDIM steps (img2img runs those at or below its strength)")
        p.add_argument("--eta", type=float, default=0.0, help="DDIM η in [0, 1]")
        p.add_argument("--guidance-scale", type=float, default=3.0, help="classifier-free guidance scale s in [0, 100]")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
        p.set_defaults(run_command=edit)

    p = commands.add_parser("evaluate", help="caption fidelity, guidance/sampler sweeps, reconstruction PSNR")
    p.add_argument("--run", required=True, help="run folder written by train_small.py (runs/NAME)")
    p.add_argument("--out", default=None, help="JSON path in an existing folder (default RUN/eval.json; the plot goes beside it)")
    p.add_argument("--prompts-per-kind", type=int, default=24, help="prompts of each kind: single, two, held_out")
    p.add_argument("--images-per-prompt", type=int, default=4)
    p.add_argument("--guidance", type=_numbers, default=[1.0, 2.0, 3.0, 5.0],
                   help="comma-separated guidance scales to sweep (DDIM), each in [0, 100]")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps for the guidance sweep")
    p.add_argument("--samplers", type=lambda s: [v for v in s.split(",") if v], default=["ddim10", "ddim20", "ddim50", "ddim100", "ddpm"],
                   help="sampler sweep at the best guidance scale: ddimN for N DDIM steps, ddpm for all T ('' to skip)")
    p.add_argument("--sweep-prompts", type=int, default=12, help="single-object prompts in the sampler sweep")
    p.add_argument("--classifier-scales", type=_numbers, default=[0.0, 1.0, 3.0, 10.0],
                   help="classifier-guidance scales γ to compare: unconditional + classifier, and CFG + classifier "
                        "('' to skip; needs a run with a classifier)")
    p.add_argument("--final-images", type=int, default=1100, metavar="N",
                   help="the headline figures: N fresh prompts of each kind, one image each, at the best guidance "
                        "scale (1100 keeps every 95 %% interval within ±3 points; 0 = skip)")
    p.add_argument("--same-noise", type=int, default=12, metavar="N",
                   help="same-noise position test at the best guidance scale: N starting noises x 9 prompted "
                        "positions (0 = skip)")
    p.add_argument("--edits", type=int, default=0, metavar="N",
                   help="editing tests at the best guidance scale: N single-object images recoloured by img2img "
                        "at each --edit-strengths, N two-object scenes with one object recoloured by inpainting "
                        "(0 = skip, the default)")
    p.add_argument("--edit-strengths", type=_numbers, default=[0.3, 0.5, 0.7, 0.9, 1.0],
                   help="img2img strengths in (0, 1] for --edits")
    p.add_argument("--reconstruction-images", type=int, default=500, help="validation images for PSNR")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.set_defaults(run_command=evaluate)


    args = parser.parse_args(argv)
    args.run_command(args)


if __name__ == "__main__":
    sys.exit(main())
