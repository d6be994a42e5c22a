"""Shared test settings, and one tiny training run that several test files read."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# the tiny preset, made smaller still so that each run takes seconds
TINY = ["--preset", "tiny", "--num-train", "256", "--num-val", "32", "--ae-steps", "40", "--steps", "40",
        "--classifier-steps", "20", "--log-every", "5", "--checkpoint-every", "20", "--sample-steps", "4",
        "--device", "cpu"]


def run_script(args, env_threads=1, **kw):
    """Start `python args...` in the repository root, output captured (stderr into stdout)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(env_threads), PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def finish(proc, timeout=240):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One uninterrupted run of train_small.py with TINY, all stages, in a subprocess: its run folder."""
    runs = tmp_path_factory.mktemp("runs")
    code, out = finish(run_script(["train_small.py", *TINY, "--runs-dir", str(runs), "--name", "ref"]))
    assert code == 0, out
    return runs / "ref"


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The tests' tensors are tiny: one intra-op thread is as fast as two, and two threads stall
    badly (OpenMP spin-waits) whenever another process shares the cores, e.g. a DDP test's workers."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
