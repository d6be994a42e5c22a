"""What the notebooks share: fast mode, and a trained run to load (`from helpers import fast_mode, find_run`).

Notebooks 02–05, 07 and 08 need a trained model (01 and 06 work on toy data). `find_run()` picks, in order:
  1. the folder in the environment variable TINYLDM_RUN (the tests point it at a tiny run);
  2. runs/small (`python train_small.py` on a GPU), then runs/cpu (`python train_small.py` on a CPU);
  3. runs/tiny, training it first (`python train_small.py --preset tiny`, about a minute on a CPU).
TINYLDM_FAST=1 asks the notebooks for fewer samples and steps (the test suite sets it).

It sits beside the notebooks, not in the package, because it may run train_small.py: the package
never reaches up into the repository. Jupyter runs a notebook in its own folder, so the notebooks
import it as `helpers`.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository root (notebooks/..)
RUNS = ROOT / "runs"
PREFERRED = ("small", "cpu", "tiny")  # best first: the GPU run, the CPU run, the tiny run


def fast_mode():
    """True when TINYLDM_FAST=1: the notebooks then use fewer samples, steps and prompts."""
    return os.environ.get("TINYLDM_FAST", "0") == "1"


def is_complete(run_dir):
    """A run folder that LatentDiffusion.load can read: model.json, tokenizer.json, model.pt."""
    return all((Path(run_dir) / name).is_file() for name in ("model.json", "tokenizer.json", "model.pt"))


def find_run(train_if_missing=True):
    """The trained run folder the notebooks load (see the module docstring for the order)."""
    if os.environ.get("TINYLDM_RUN"):
        run = Path(os.environ["TINYLDM_RUN"])
        if not is_complete(run):
            raise FileNotFoundError(f"TINYLDM_RUN={run} is not a complete run folder "
                                    "(it needs model.json, tokenizer.json and model.pt)")
        return run
    for name in PREFERRED:
        if is_complete(RUNS / name):
            return RUNS / name
    if not train_if_missing:
        raise FileNotFoundError(f"no trained run in {RUNS}; make one with `python train_small.py`")
    print("No trained run found: training the tiny preset (about a minute on a CPU) ...", flush=True)
    command = [sys.executable, str(ROOT / "train_small.py"), "--preset", "tiny", "--runs-dir", str(RUNS)]
    if (RUNS / "tiny" / "checkpoint.pt").is_file():
        command.append("--resume")  # an interrupted tiny run: finish it
    elif (RUNS / "tiny").is_dir():
        command.append("--overwrite")  # an incomplete tiny run without a checkpoint: start again
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"training the tiny preset failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    print(*done.stdout.strip().splitlines()[-1:])  # the script's last line: where the run went
    return RUNS / "tiny"
