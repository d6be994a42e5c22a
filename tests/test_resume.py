"""Checkpoints, --resume and log.jsonl are exact: what a user meets after a crash, a Ctrl-C or a NaN."""

import json
import os
import shlex
import signal
import socket
import subprocess
import sys

import pytest
import torch

import train_small

# a run of a few seconds: every stage but the classifier, one log line per step
FAST = ["--preset", "tiny", "--num-train", "64", "--num-val", "16", "--ae-steps", "4", "--steps", "4",
        "--classifier-steps", "0", "--log-every", "1", "--checkpoint-every", "2", "--sample-steps", "2",
        "--device", "cpu"]


@pytest.fixture(autouse=True)
def keep_sigint():
    """train_small.main installs its own Ctrl-C handler in this process: put pytest's back afterwards."""
    before = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, before)


def interrupt_at(monkeypatch, when, how="ctrl-c"):
    """At the log check of (stage, step) in `when`, press Ctrl-C once (a clean stop at the next step),
    or 'kill' the run there: KeyboardInterrupt, as a second Ctrl-C, with no checkpoint written."""
    real, pending = train_small.check_finite, set(when)

    def check(loss, stage, step, run):
        real(loss, stage, step, run)
        if (stage, step + 1) in pending:
            pending.discard((stage, step + 1))
            if how == "kill":
                raise KeyboardInterrupt
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(train_small, "check_finite", check)


def log_keys(run_dir):
    return [(r["stage"], r["step"]) for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())]


def test_nan_loss_never_replaces_the_good_checkpoint(tmp_path):
    """NaN between two log checks but at a checkpoint step: the run stops there, and checkpoint.pt stays the
    last finite one, as the message says."""
    args = [*FAST, "--runs-dir", str(tmp_path), "--name", "nan", "--steps", "20", "--lr", "1e6",
            "--log-every", "20", "--checkpoint-every", "5"]
    with pytest.raises(SystemExit, match="not finite.*last good checkpoint") as stop:
        train_small.main(args)
    state = torch.load(tmp_path / "nan" / "checkpoint.pt", weights_only=True)
    for part in ("unet", "text_encoder", "ema_unet", "ema_text_encoder"):
        assert all(torch.isfinite(v).all() for v in state[part].values()), part
    assert f"step {state['step']}" in str(stop.value)  # the message names the checkpoint it kept


def test_resume_of_a_finished_run_says_so_and_trains_nothing(tmp_path, capsys):
    args = [*FAST, "--runs-dir", str(tmp_path), "--name", "done"]
    train_small.main(args)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "done").iterdir()}
    with pytest.raises(SystemExit) as stop:
        train_small.main(args + ["--resume"])
    assert stop.value.code in (0, None)
    assert "finished" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "done").iterdir()} == before


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_cleanly(tmp_path, monkeypatch):
    args = [*FAST, "--runs-dir", str(tmp_path), "--name", "early", "--checkpoint-every", "100"]
    interrupt_at(monkeypatch, {(1, 3)}, how="kill")
    with pytest.raises(KeyboardInterrupt):
        train_small.main(args)
    assert not (tmp_path / "early" / "checkpoint.pt").exists() and log_keys(tmp_path / "early")
    train_small.main(args + ["--resume"])
    keys = log_keys(tmp_path / "early")
    assert keys == sorted(set(keys)) and keys[0] == (1, 1)  # one log, no second copy


def test_the_printed_resume_command_works_as_printed(tmp_path, monkeypatch, capsys):
    """The hint repeats the settings (--preset, --runs-dir, ...); `runs/` and `runs` are the same folder."""
    runs = str(tmp_path) + "/"  # as a shell completes it
    interrupt_at(monkeypatch, {(1, 2), (3, 2)})
    with pytest.raises(SystemExit, match="checkpoint saved") as stop:
        train_small.main([*FAST, "--runs-dir", runs, "--name", "hint", "--overwrite"])
    command = shlex.split(str(stop.value).split("Continue with: ")[1])
    assert command[:2] == ["python", "train_small.py"] and "--overwrite" not in command
    with pytest.raises(SystemExit, match="checkpoint saved"):  # followed literally, it resumes (to stage 3)
        train_small.main(command[2:])
    assert log_keys(tmp_path / "hint")[-1] == (3, 2)
    train_small.main([*FAST, "--runs-dir", str(tmp_path), "--name", "hint", "--resume"])  # no trailing /
    assert (tmp_path / "hint" / "model.pt").is_file()


def test_a_torn_last_log_line_is_dropped_on_resume(tmp_path, monkeypatch):
    args = [*FAST, "--runs-dir", str(tmp_path), "--name", "torn"]
    interrupt_at(monkeypatch, {(3, 2)})
    with pytest.raises(SystemExit, match="checkpoint saved"):
        train_small.main(args)
    with open(tmp_path / "torn" / "log.jsonl", "a") as f:
        f.write('{"stage": 3, "step": 3, "lo')  # a crash in the middle of a write
    train_small.main(args + ["--resume"])
    keys = log_keys(tmp_path / "torn")
    assert keys == sorted(set(keys)) and keys[-1] == (3, 4)


def test_ctrl_c_during_the_final_save_says_what_it_does(tmp_path, monkeypatch, capsys):
    """Past the last step there is no checkpoint to save: Ctrl-C says the run finishes, and it does."""
    real = train_small.save_samples

    def save_samples(model, prompts, path, *args, **kwargs):
        if path.name == "samples_final.png":
            signal.raise_signal(signal.SIGINT)
        return real(model, prompts, path, *args, **kwargs)

    monkeypatch.setattr(train_small, "save_samples", save_samples)
    train_small.main([*FAST, "--runs-dir", str(tmp_path), "--name", "late"])
    err = capsys.readouterr().err
    assert "Ctrl-C" in err and "saving a checkpoint" not in err and "finishing" in err
    assert (tmp_path / "late" / "metrics.json").is_file() and not (tmp_path / "late" / "checkpoint.pt").exists()


def test_metrics_after_a_resume_have_the_keys_of_an_uninterrupted_run(tmp_path, monkeypatch):
    train_small.main([*FAST, "--runs-dir", str(tmp_path), "--name", "whole"])
    args = [*FAST, "--runs-dir", str(tmp_path), "--name", "cut"]
    real = train_small.save_run

    def killed(*a):  # killed after stage 3's final checkpoint, before model.pt
        monkeypatch.setattr(train_small, "save_run", real)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_small, "save_run", killed)
    with pytest.raises(KeyboardInterrupt):
        train_small.main(args)
    train_small.main(args + ["--resume"])
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    cut = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert set(cut) == set(whole) and cut["final_loss"] == whole["final_loss"]


def test_a_run_in_progress_is_locked_and_a_dead_ones_lock_is_not(tmp_path, monkeypatch):
    """A second start of a running run (even with --overwrite) is refused before it touches the folder; a lock
    left by a process that no longer exists does not block a --resume, which removes it at its end."""
    args = [*FAST, "--runs-dir", str(tmp_path), "--name", "busy"]
    interrupt_at(monkeypatch, {(3, 2)})
    with pytest.raises(SystemExit, match="checkpoint saved"):
        train_small.main(args)
    run_dir = tmp_path / "busy"
    assert not (run_dir / train_small.LOCK).exists()  # removed when the run stopped
    (run_dir / train_small.LOCK).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}
    for extra in (["--resume"], ["--overwrite"]):
        with pytest.raises(SystemExit, match=f"already running.*{train_small.LOCK}"):
            train_small.main(args + extra)
        assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == before
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run_dir / train_small.LOCK).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    train_small.main(args + ["--resume"])
    assert (run_dir / "model.pt").is_file() and not (run_dir / train_small.LOCK).exists()


def test_a_full_disk_is_one_line_and_keeps_the_good_checkpoint(tmp_path, monkeypatch):
    """torch.save on a full disk fails with "unexpected pos": the user reads that the disk is full, the last
    good checkpoint is still there and loads, and no half-written temporary file is left behind."""
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) > 3:  # the first checkpoints fit, then the disk is full
            with open(f, "wb") as fh:
                fh.write(b"half")
            raise RuntimeError("[enforce fail at inline_container.cc:778] . unexpected pos 1234 vs 5678")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(train_small.shutil, "disk_usage", lambda path: type("U", (), {"free": 0})())
    with pytest.raises(SystemExit, match="disk is full. Stopping; the last good checkpoint is kept; continue with"):
        train_small.main([*FAST, "--runs-dir", str(tmp_path), "--name", "full"])
    monkeypatch.setattr(torch, "save", real_save)
    state = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    assert state["step"] > 0
    assert not [p.name for p in (tmp_path / "full").iterdir() if p.name.endswith(".tmp")]


def test_a_folder_that_is_not_writable_is_one_line(tmp_path, monkeypatch):
    """A runs folder the user may not write to (or a read-only disk): one line that says so."""
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "ro" / "train_config.json"))

    monkeypatch.setattr(train_small, "start_run_folder", refuse)
    with pytest.raises(SystemExit, match=r"cannot write .*train_config.json: the folder is not writable"):
        train_small.main([*FAST, "--runs-dir", str(tmp_path), "--name", "ro"])
