"""Why two-object prompts fail: what the samples get wrong, and where the cross-attention looks.

    python scripts/binding.py --run runs/cpu                  # 256 prompts, 256 validation images
    python scripts/binding.py --run runs/cpu --out binding.json

1. Samples. Two-object prompts ("a red circle left of a blue square", evaluate.prompt_set), DDIM-50 at
   --guidance, read by the detector. Of the images with two objects found: both prompted colours drawn
   (as a set), a colour the prompt does not name, one colour twice where the prompt names two (of those
   prompts); the same for shapes; how many of
   the two (colour, shape) pairs appear; and swaps (the right colours and shapes, on the wrong objects).
   Swaps would mean binding fails alone; blended or missing attributes mean the objects are not told apart.
2. Cross-attention. Real two-object validation images (ground truth known), noised to t, one U-Net pass
   with their captions. For every cross-attention layer, the total variation between the token
   distributions at the two objects' cells, TV(A[p0], A[p1]) = ½ Σ_l |A[p0, l] − A[p1, l]|, averaged over
   heads, against the same two cells of another image (the same places, another scene's objects). A layer that
   sends each object's words to its own place gives the objects a larger TV; a layer that reads the caption
   the same way everywhere gives both the same.
"""

import argparse
import json
import math
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tinyldm.data import ShapesConfig, ShapesDataset, to_float  # noqa: E402
from tinyldm.evaluate import detect, prompt_set  # noqa: E402
from tinyldm.ldm import LatentDiffusion  # noqa: E402


def breakdown(targets, detections):
    """Shares of the images with >= 2 detections (the two largest judged): see the module docstring.
    targets: evaluate targets of kind "two"; detections: evaluate.detect's lists."""
    counts, n_two = Counter(), 0
    for target, dets in zip(targets, detections, strict=True):
        if len(dets) < 2:
            continue
        n_two += 1
        want = [(o["colour"], o["shape"]) for o in target["objects"]]
        got = [(d["colour"], d["shape"]) for d in dets[:2]]
        for k, name in ((0, "colour"), (1, "shape")):
            wanted, drawn = {w[k] for w in want}, [g[k] for g in got]
            counts[f"{name}s_both_drawn"] += set(drawn) == wanted
            counts[f"{name}_not_in_prompt"] += any(x not in wanted for x in drawn)
            if len(wanted) == 2:  # "twice" is an error only when the prompt names two different values
                counts[f"{name}_twice"] += drawn[0] == drawn[1]
                counts[f"two_{name}s_named"] += 1
        counts["pairs_both_right"] += all(w in got for w in want)
        counts["swapped"] += ({g[0] for g in got} == {w[0] for w in want} and
                              {g[1] for g in got} == {w[1] for w in want} and set(got) != set(want))
    out = {"images": len(targets), "two_found": n_two / max(len(targets), 1)}
    for key in ("colours_both_drawn", "colour_not_in_prompt", "shapes_both_drawn", "shape_not_in_prompt",
                "pairs_both_right", "swapped"):
        out[key] = counts[key] / max(n_two, 1)
    for name in ("colour", "shape"):  # of the prompts that name two different colours (shapes)
        out[f"{name}_twice"] = counts[f"{name}_twice"] / max(counts[f"two_{name}s_named"], 1)
    return out


def sample_breakdown(model, n, guidance, seed=0, batch_size=64):
    pairs = prompt_set("two", n, seed=seed)
    generator, detections = torch.Generator(model.device).manual_seed(seed), []
    with torch.no_grad():
        for i in range(0, n, batch_size):
            images = model.generate([p for p, _ in pairs[i:i + batch_size]], steps=50, guidance_scale=guidance,
                                    generator=generator)                                       # (b, 3, H, W)
            detections += detect(images)
    return breakdown([t for _, t in pairs], detections)


def cell(x, y, side):
    """The index of the side×side grid cell holding the point (x, y), fractions of the image."""
    return min(int(y * side), side - 1) * side + min(int(x * side), side - 1)


def attention_selectivity(model, n, timesteps=(800, 500, 200), seed=0, batch_size=64):
    """{t: {layer: {"tv_objects", "tv_control", "pairs"}}} on n real two-object validation images.
    tv_objects: TV between the two objects' cells of image b; tv_control: TV between the same two cells of
    the next image of its batch (the same places, another scene's objects)."""
    val = ShapesDataset(ShapesConfig(image_size=model.image_size, num_val=n, two_object_prob=1.0), "val")
    s, sums = val.scenes, {}
    images = to_float(val.images_uint8(model.device))                                                    # (n, 3, H, W)
    model.unet.keep_attention_weights(True)
    try:
        with torch.no_grad():
            # near-equal batches, none of one image: the control needs a second image in the batch
            for chunk in torch.tensor_split(torch.arange(n), math.ceil(n / batch_size)):
                start, B = int(chunk[0]), len(chunk)
                batch = slice(start, start + B)
                z0 = model.encode_images(images[batch], sample=False)                                  # (B, z, h, w)
                context, mask = model.encode_text(val.captions[batch])                                 # (B, L, d)
                for t in timesteps:
                    eps = torch.randn(z0.shape, generator=torch.Generator(model.device).manual_seed(seed + start),
                                      device=model.device)                                             # (B, z, h, w)
                    tt = torch.full((B,), t, device=model.device)                                      # (B,)
                    model.unet(model.schedule.q_sample(z0, tt, eps), tt, context, mask)  # DDPM Eq. 4: z_t
                    for name, weights in model.unet.kept_attention_weights().items():  # (B, heads, HW, L)
                        side = int(weights.shape[2] ** 0.5)
                        p = torch.tensor([cell(x, y, side) for x, y in zip(s.cx[batch, 0], s.cy[batch, 0])])  # (B,)
                        q = torch.tensor([cell(x, y, side) for x, y in zip(s.cx[batch, 1], s.cy[batch, 1])])  # (B,)
                        b, other = torch.arange(B), torch.arange(1, B + 1) % B  # image b and the next one
                        tv = lambda i: 0.5 * (weights[i, :, p] - weights[i, :, q]).abs().sum(-1).mean(-1)  # ½Σ_l|A_pl − A_ql|, (B,)
                        apart = (p != q).to(weights.device)  # (B,) the objects in different cells
                        acc = sums.setdefault(t, {}).setdefault(name, [0.0, 0.0, 0])
                        acc[0] += tv(b)[apart].sum().item()
                        acc[1] += tv(other)[apart].sum().item()
                        acc[2] += int(apart.sum())
    finally:
        model.unet.keep_attention_weights(False)
    return {t: {name: {"tv_objects": a[0] / max(a[2], 1), "tv_control": a[1] / max(a[2], 1), "pairs": a[2]}
                for name, a in layers.items()} for t, layers in sums.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a run folder (LatentDiffusion.save)")
    parser.add_argument("--prompts", type=int, default=256, help="two-object prompts to sample, one image each")
    parser.add_argument("--images", type=int, default=256, help="two-object validation images for the attention")
    parser.add_argument("--guidance", type=float, default=2.0, help="CFG scale for the samples")
    parser.add_argument("--out", default="", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.prompts < 1 or args.images < 2:
        raise SystemExit(f"--prompts must be >= 1 and --images >= 2; got {args.prompts} and {args.images}")
    if not math.isfinite(args.guidance):
        raise SystemExit(f"--guidance must be a finite number; got {args.guidance}")
    if not (Path(args.run) / "model.json").is_file():
        raise SystemExit(f"--run {args.run}: no model.json there (not a finished run folder)")
    if args.out and not Path(args.out).resolve().parent.is_dir():
        raise SystemExit(f"--out {args.out}: its folder does not exist")
    model = LatentDiffusion.load(args.run).eval()
    samples = sample_breakdown(model, args.prompts, args.guidance)
    print(f"samples, {args.prompts} two-object prompts, DDIM-50, s = {args.guidance}: two objects found in "
          f"{samples['two_found']:.3f}; of those:")
    for key, value in samples.items():
        if key not in ("images", "two_found"):
            print(f"  {key:<22} {value:.3f}")
    attention = attention_selectivity(model, args.images)
    print(f"cross-attention on {args.images} two-object validation images: TV between the objects' cells "
          "(the same cells of the next image)")
    for t, layers in attention.items():
        for name, r in layers.items():
            print(f"  t = {t:<4} {name:<45} {r['tv_objects']:.3f} ({r['tv_control']:.3f})")
    if args.out:
        Path(args.out).write_text(json.dumps({"run": args.run, "guidance_scale": args.guidance,
                                              "samples": samples, "attention": attention}, indent=1))


if __name__ == "__main__":
    main()
