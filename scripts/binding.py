"""Why two-object prompts fail: what the samples get wrong, and where the cross-attention looks.

    python scripts/binding.py --run runs/cpu                  # 256 prompts, 256 validation images
    python scripts/binding.py --run runs/cpu --out binding.json

1. Samples. Two-object prompts ("a red circle left of a blue square", evaluate.prompt_set), DDIM-50 at
   --guidance, read by the detector. Of the images with two objects found: both prompted colours drawn
   (as a set), the same colour twice, a colour the prompt does not name; the same for shapes; how many of
   the two (colour, shape) pairs appear; and swaps (the right colours and shapes, on the wrong objects).
   Swaps would mean binding fails alone; blended or missing attributes mean the objects are not told apart.
2. Cross-attention. Real two-object validation images (ground truth known), noised to t, one U-Net pass
   with their captions. For every cross-attention layer, the total variation between the token
   distributions at the two objects' cells, TV(A[p0], A[p1]) = ½ Σ_l |A[p0, l] − A[p1, l]|, averaged over
   heads, against the same between two random cells. A layer that sends each object's words to its own
   place gives the objects a larger TV than random cells; a layer that reads the caption the same way
   everywhere gives both the same.
"""

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
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
            counts[f"{name}_twice"] += drawn[0] == drawn[1]
            counts[f"{name}_not_in_prompt"] += any(x not in wanted for x in drawn)
        counts["pairs_both_right"] += all(w in got for w in want)
        counts["swapped"] += ({g[0] for g in got} == {w[0] for w in want} and
                              {g[1] for g in got} == {w[1] for w in want} and set(got) != set(want))
    out = {"images": len(targets), "two_found": n_two / max(len(targets), 1)}
    out.update({k: counts[k] / max(n_two, 1) for k in sorted(counts)})
    return out


def sample_breakdown(model, n, guidance, seed=0, batch_size=64):
    pairs = prompt_set("two", n, seed=seed)
    generator, detections = torch.Generator(model.device).manual_seed(seed), []
    with torch.no_grad():
        for i in range(0, n, batch_size):
            images = model.generate([p for p, _ in pairs[i:i + batch_size]], steps=50, guidance_scale=guidance,
                                    generator=generator)
            detections += detect(images)
    return breakdown([t for _, t in pairs], detections)


def cell(x, y, side):
    """The index of the side×side grid cell holding the point (x, y), fractions of the image."""
    return min(int(y * side), side - 1) * side + min(int(x * side), side - 1)


def attention_selectivity(model, n, timesteps=(800, 500, 200), seed=0):
    """{t: {layer: {"tv_objects", "tv_random"}}} on n real two-object validation images."""
    scenes_cfg = ShapesConfig(image_size=model.image_size, num_val=n, two_object_prob=1.0)
    val = ShapesDataset(scenes_cfg, "val")
    s = val.scenes
    rng = np.random.default_rng(seed)
    result = {}
    model.unet.keep_attention_weights(True)
    try:
        with torch.no_grad():
            z0 = model.encode_images(to_float(val.images_uint8(model.device)), sample=False)  # (n, z, h, w)
            ids, mask = model.tokenize(val.captions)
            context = model.text_encoder(ids, mask)                                          # (n, L, d)
            for t in timesteps:
                eps = torch.randn(z0.shape, generator=torch.Generator(model.device).manual_seed(seed),
                                  device=model.device)
                tt = torch.full((n,), t, device=model.device)
                model.unet(model.schedule.q_sample(z0, tt, eps), tt, context, mask)
                result[t] = {}
                for name, weights in model.unet.kept_attention_weights().items():  # (n, heads, HW, L)
                    side = int(weights.shape[2] ** 0.5)

                    def tv(b, p, q):  # ½ Σ_l |A[p, l] − A[q, l]|, mean over heads
                        return 0.5 * (weights[b, :, p] - weights[b, :, q]).abs().sum(-1).mean().item()
                    objects = [(b, cell(s.cx[b, 0], s.cy[b, 0], side), cell(s.cx[b, 1], s.cy[b, 1], side))
                               for b in range(n)]
                    tv_objects = [tv(b, p, q) for b, p, q in objects if p != q]
                    tv_random = [tv(b, *rng.choice(side * side, 2, replace=False)) for b in range(n)]
                    result[t][name] = {"tv_objects": float(np.mean(tv_objects)), "tv_random": float(np.mean(tv_random)),
                                       "pairs": len(tv_objects)}
    finally:
        model.unet.keep_attention_weights(False)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a run folder (LatentDiffusion.save)")
    parser.add_argument("--prompts", type=int, default=256, help="two-object prompts to sample, one image each")
    parser.add_argument("--images", type=int, default=256, help="two-object validation images for the attention")
    parser.add_argument("--guidance", type=float, default=2.0, help="CFG scale for the samples")
    parser.add_argument("--out", default="", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.prompts < 1 or args.images < 1:
        raise SystemExit(f"--prompts and --images must be >= 1; got {args.prompts} and {args.images}")
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
          "(random cells)")
    for t, layers in attention.items():
        for name, r in layers.items():
            print(f"  t = {t:<4} {name:<45} {r['tv_objects']:.3f} ({r['tv_random']:.3f})")
    if args.out:
        Path(args.out).write_text(json.dumps({"run": args.run, "guidance_scale": args.guidance,
                                              "samples": samples, "attention": attention}, indent=1))


if __name__ == "__main__":
    main()
