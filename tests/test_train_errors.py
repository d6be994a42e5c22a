"""train_small.py refuses a bad setting before it writes or deletes anything: one line naming the flag."""

import pytest
import torch

import train_small

# a run that would take seconds, were its settings good
FAST = ["--preset", "tiny", "--num-train", "64", "--num-val", "16", "--ae-steps", "2", "--steps", "2",
        "--classifier-steps", "0", "--sample-steps", "2", "--device", "cpu"]

BAD = [  # (flag and its bad value, what the message must name)
    (["--schedule", "foo"], "--schedule"),
    (["--heads", "3"], "--heads"),
    pytest.param(["--device", "cuda"], "--device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")),
    (["--device", "gpu0"], "--device"),
    (["--seed", "-1"], "--seed"),
    (["--log-every", "0"], "--log-every"),
    (["--checkpoint-every", "0"], "--checkpoint-every"),
    (["--batch-size", "0"], "--batch-size"),
    (["--num-train", "0"], "--num-train"),
    (["--vocab-size", "1"], "--vocab-size"),
    (["--image-size", "30"], "--image-size"),
    (["--steps", "-5"], "--steps"),
    (["--steps", "0"], "--steps"),
    (["--ema-decay", "2"], "--ema-decay"),
    (["--max-length", "1"], "--max-length"),
    (["--lr", "nan"], "--lr"),
    (["--unet-attention", "5"], "--unet-attention"),
    (["--two-object-prob", "1.5"], "--two-object-prob"),
]


def files_under(root):
    """{path relative to root: bytes} of every file below root: what a refused command must leave alone."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def refused(argv, flag):
    """train_small.main(argv) exits with one line that names `flag`; the line."""
    with pytest.raises(SystemExit) as exit_info:
        train_small.main(argv)
    message = exit_info.value.code
    assert isinstance(message, str), message  # a message, so the exit status is 1
    assert flag in message and "\n" not in message, message
    return message


@pytest.mark.parametrize("bad, flag", BAD)
def test_a_bad_value_is_refused_before_any_file_is_written(tmp_path, bad, flag):
    runs = tmp_path / "runs"
    refused([*FAST, "--runs-dir", str(runs), "--name", "r", *bad], flag)
    assert not runs.exists()


def test_overwrite_with_a_bad_value_keeps_the_old_run(tmp_path):
    """--overwrite replaces a run only once every setting is known to be good."""
    runs = tmp_path / "runs"
    (runs / "done").mkdir(parents=True)
    for name in ("train_config.json", "model.json", "model.pt", "log.jsonl"):
        (runs / "done" / name).write_text(f"the finished run's {name}")
    before = files_under(tmp_path)
    refused([*FAST, "--runs-dir", str(runs), "--name", "done", "--overwrite", "--lr", "-1"], "--lr")
    assert files_under(tmp_path) == before


@pytest.mark.parametrize("name", [".", "..", "ABSOLUTE", "sub/run", "sub/.."])
def test_name_must_be_one_folder_inside_runs_dir(tmp_path, name):
    """--overwrite with a name that is not one folder name would delete the runs folder, or more."""
    runs = tmp_path / "runs"
    for run in ("sibling", "sub/run"):
        (runs / run).mkdir(parents=True)
        (runs / run / "model.pt").write_text(f"the weights of {run}")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "notes.txt").write_text("not a run")
    name = str(tmp_path / "elsewhere") if name == "ABSOLUTE" else name
    before = files_under(tmp_path)
    refused([*FAST, "--runs-dir", str(runs), "--name", name, "--overwrite"], "--name")
    assert files_under(tmp_path) == before


def test_cpu_threads_leave_busy_cores_alone(monkeypatch):
    """--threads N is taken as given; 0 uses the cores other processes leave free, shared among the
    machine's training processes, and never fewer than 1."""
    import os

    import train_small

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert 0 <= train_small.busy_cores(0.05) <= cores + 0.5
    assert train_small.cpu_threads(3) == 3
    monkeypatch.setattr(train_small, "busy_cores", lambda: 0.0)
    assert train_small.cpu_threads(0) == cores
    assert train_small.cpu_threads(0, processes=2) == max(1, cores // 2)  # torchrun's processes share them
    assert train_small.cpu_threads(3, processes=2) == 3
    monkeypatch.setattr(train_small, "busy_cores", lambda: cores - 1.0)
    assert train_small.cpu_threads(0) == 1
    monkeypatch.setattr(train_small, "busy_cores", lambda: cores + 3.0)
    assert train_small.cpu_threads(0) == 1
