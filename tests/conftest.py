"""Shared test settings, and one tiny training run that several test files read."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from course.assignments import NUMBERS, RegionTracer

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


# --- course assignments: `@pytest.mark.assignment(N)` (see course/assignments.py) -------------


def pytest_addoption(parser):
    parser.addoption("--assignment", type=int, action="append", metavar="N",
                     help="run only the tests of assignment N (repeatable)")
    parser.addoption("--trace-regions", metavar="FILE",
                     help="write which assignment regions each test ran through (JSON), for tests/test_assignments.py")


def pytest_configure(config):
    if config.getoption("trace_regions"):
        config.region_tracer = RegionTracer()


def pytest_collection_modifyitems(config, items):
    """Check each test's assignment marker (one at most, a known number), record it for the grader's
    report (junit XML property "assignment"), and keep only the tests of --assignment if given."""
    wanted = config.getoption("assignment")
    selected, deselected = [], []
    for item in items:
        marks = list(item.iter_markers("assignment"))
        if len(marks) > 1:
            raise pytest.UsageError(f"{item.nodeid}: {len(marks)} assignment markers; a test grades one assignment")
        number = marks[0].args[0] if marks and marks[0].args else None
        if marks and number not in NUMBERS:
            raise pytest.UsageError(f"{item.nodeid}: assignment({marks[0].args}) is not one of {NUMBERS}")
        if number is not None:
            item.user_properties.append(("assignment", number))
        (selected if wanted is None or number in wanted else deselected).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = selected


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    tracer = getattr(item.config, "region_tracer", None)
    if tracer is not None:
        tracer.start()
    try:
        yield
    finally:
        if tracer is not None:
            tracer.stop(item.nodeid)


def pytest_sessionfinish(session):
    tracer = getattr(session.config, "region_tracer", None)
    if tracer is not None:
        Path(session.config.getoption("trace_regions")).write_text(json.dumps(tracer.record, indent=1))
