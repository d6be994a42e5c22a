"""Command line: `python -m tinyldm COMMAND ...` (`python -m tinyldm --help` lists them)."""

import argparse
import sys


def show_data(args):
    """Save a grid of Shapes images with their captions (the README's data figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tinyldm.data import ShapesConfig, ShapesDataset

    ds = ShapesDataset(ShapesConfig(image_size=args.image_size, num_train=args.rows * args.cols,
                                    seed=args.seed), "train")
    images = ds.images_uint8()
    fig, axes = plt.subplots(args.rows, args.cols, figsize=(2.2 * args.cols, 2.8 * args.rows))
    for i, ax in enumerate(axes.flat):
        ax.imshow(images[i].permute(1, 2, 0).numpy(), interpolation="nearest")
        words, lines = ds.captions[i].split(), [""]
        for w in words:  # wrap the caption at ~24 characters
            lines[-1:] = [lines[-1] + " " + w] if len(lines[-1]) + len(w) < 24 else [lines[-1], w]
        ax.set_title("\n".join(line.strip() for line in lines), fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(args.out, dpi=args.dpi)
    print(f"wrote {args.out}")


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
    p.set_defaults(run=show_data)

    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    sys.exit(main())
