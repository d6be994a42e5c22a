"""bench.png: cost and quality on one page, drawn from the results dict that bench.py writes as JSON.

    python -m benchmarks.plot bench.json bench.png     # redraw from a saved bench.json

Panels: (a) U-Net training step time against image size, one line per f; (b) the activations kept for
backward, the same axes; (c) sampling time against DDIM steps, with the caption fidelity measured at those
steps (95 % interval) on a second axis when bench ran with --fidelity; (d) MFU against batch size.
"""

import json
import re
import sys
from pathlib import Path


def _value(figures, name):
    entry = figures.get(name)
    return None if entry is None else entry["value"]


def plot(results, path):
    """Draw the four panels of `results` (bench.run's dict) into the PNG `path`."""
    import matplotlib
    matplotlib.use("Agg")  # a file, never a window
    import matplotlib.pyplot as plt

    figures = results["figures"]
    cells = sorted({(int(m[1]), int(m[2])) for m in (re.fullmatch(r"growth_(\d+)px_f(\d+)_step_s", n) for n in figures) if m})
    sizes = sorted({size for size, _ in cells})
    factors = sorted({f for _, f in cells})
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    for ax, kind, unit in ((axes[0], "step_s", "s per training step"), (axes[1], "activations_mib", "MiB kept for backward")):
        for f in factors:
            points = [(size, _value(figures, f"growth_{size}px_f{f}_{kind}")) for size in sizes]
            points = [(x, y) for x, y in points if y is not None]
            if points:
                ax.plot(*zip(*points), "o-", label=f"f = {f}" + (" (pixels)" if f == 1 else ""))
        ax.set(xscale="log", yscale="log", xlabel="image size (pixels per side)", ylabel=unit)
        ax.set_xticks(sizes, [str(size) for size in sizes], minor=False)
        ax.set_xticks([], minor=True)  # no log-scale minor ticks: their labels collide with these
        ax.legend(fontsize=8)
    batch = results["config"]["bench"].get("growth_batch")
    axes[0].set_title(f"(a) U-Net step, batch {batch}")
    axes[1].set_title("(b) activations")

    ax = axes[2]
    steps = sorted(int(m[1]) for m in (re.fullmatch(r"ddim(\d+)_sample_s", n) for n in figures) if m)
    times = [_value(figures, f"ddim{n}_sample_s") for n in steps]
    ax.plot(steps, times, "o-", color="C0")
    ax.set(xscale="log", yscale="log", xlabel="DDIM steps", ylabel="s per batch (CFG)",
           title="(c) sampling time and fidelity")
    ax.set_xticks(steps, [str(n) for n in steps], minor=False)
    ax.set_xticks([], minor=True)
    with_fidelity = [n for n in steps if "fidelity" in figures[f"ddim{n}_sample_s"]]
    if with_fidelity:
        twin = ax.twinx()
        share = [figures[f"ddim{n}_sample_s"]["fidelity"] for n in with_fidelity]
        ci = [figures[f"ddim{n}_sample_s"]["fidelity_ci"] for n in with_fidelity]
        twin.errorbar(with_fidelity, share, yerr=[[p - lo for p, (lo, _) in zip(share, ci)],
                                                  [hi - p for p, (_, hi) in zip(share, ci)]],
                      fmt="s--", color="C3", capsize=3)
        twin.set(ylim=(0, 1), ylabel="single-object all-right (95 % CI)")
        twin.yaxis.label.set_color("C3")

    ax = axes[3]
    mfu = sorted((figures[n]["batch"], figures[n]["value"]) for n in figures if n.startswith("mfu_batch_"))
    if mfu:
        ax.plot(*zip(*mfu), "o-")
    ax.set(xscale="log", xlabel="batch size", ylabel="achieved / measured peak FLOP/s",
           title="(d) MFU of the latent step", ylim=(0, None))
    if mfu:
        ax.set_xticks([b for b, _ in mfu], [str(b) for b, _ in mfu], minor=False)
        ax.set_xticks([], minor=True)
    fig.suptitle(f"tinyldm bench: {results['device']}, torch {results['torch']}, {results['config']['precision']}, "
                 f"load average {results['load_average'][0]:.1f}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m benchmarks.plot BENCH_JSON OUT_PNG")
    plot(json.loads(Path(sys.argv[1]).read_text()), sys.argv[2])
