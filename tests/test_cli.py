"""The command lines' arguments and outputs: every bad value is a one-line error before any work."""

import pytest
import torch

import tinyldm.__main__ as tinyldm_cli
from course.__main__ import main as course_cli
from tinyldm.__main__ import main as cli

DOLLARS = r"a red $\frac{ circle$"  # invalid TeX: matplotlib's mathtext would raise on it


class FakeModel:
    """Stands in for a trained run: `generate` returns random images in [-1, 1], one per prompt."""

    def generate(self, prompts, **kwargs):
        return torch.rand(len(prompts), 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.fixture
def fake_run(monkeypatch):
    monkeypatch.setattr(tinyldm_cli, "_load_run", lambda args: (FakeModel(), torch.device("cpu")))


@pytest.fixture
def no_run(monkeypatch, tmp_path):
    """Loading the run fails the test: an argument error must come before it (and so before any sampling)."""
    def load(args):
        pytest.fail("the run was loaded before the arguments were checked")
    monkeypatch.setattr(tinyldm_cli, "_load_run", load)
    monkeypatch.chdir(tmp_path)  # the default --out lands here
    return ["--run", str(tmp_path / "run")]


def test_dollar_in_a_prompt_is_drawn_as_text(fake_run, tmp_path):
    """A "$" in a prompt or caption is drawn as text, never parsed as maths: sample's grid and save_grid
    (train_small.py's sample grids) both write their PNG."""
    out = tmp_path / "grid.png"
    cli(["sample", "--run", "unused", "--out", str(out), "--num-images", "2", DOLLARS, "costs $5"])
    assert out.stat().st_size > 1000
    tinyldm_cli.save_grid(torch.zeros(2, 3, 16, 16, dtype=torch.uint8), [DOLLARS, "$x$"], tmp_path / "g.png",
                          cols=2)
    assert (tmp_path / "g.png").stat().st_size > 1000


@pytest.mark.parametrize("flag, value, message", [
    ("--guidance-scale", "nan", "--guidance-scale must be a number in \\[0, 100\\]"),
    ("--guidance-scale", "inf", "--guidance-scale must be a number in \\[0, 100\\]"),
    ("--guidance-scale", "1e30", "--guidance-scale must be a number in \\[0, 100\\]"),
    ("--guidance-scale", "-1", "--guidance-scale must be a number in \\[0, 100\\]"),
    ("--eta", "nan", "--eta must be in \\[0, 1\\]"),
    ("--eta", "1.5", "--eta must be in \\[0, 1\\]"),
    ("--classifier-scale", "nan", "--classifier-scale must be a finite number >= 0"),
    ("--num-images", "0", "--num-images must be >= 1"),
    ("--steps", "0", "--steps must be >= 1"),
])
def test_sample_rejects_bad_numbers_before_loading(no_run, flag, value, message):
    with pytest.raises(SystemExit, match=message):
        cli(["sample", *no_run, flag, value, "a red circle"])


def test_classifier_scale_and_target_come_together(no_run):
    """Either alone would be silently ignored (no guidance, no word): each is an error that names the other."""
    with pytest.raises(SystemExit, match="--classifier-scale needs --target"):
        cli(["sample", *no_run, "--classifier-scale", "10", ""])
    with pytest.raises(SystemExit, match="--target 'colour=red' needs --classifier-scale"):
        cli(["sample", *no_run, "--target", "colour=red", ""])


def test_sample_output_path_is_checked_before_loading(no_run, tmp_path):
    (tmp_path / "afile").write_text("")
    for out, message in [(tmp_path / "missing" / "x.png", "the folder .*missing does not exist"),
                         ("noext", "must end in .png"), ("x.txt", "must end in .png"),
                         (tmp_path / "afile" / "x.png", "does not exist"),
                         (tmp_path / "folder.png", "is a folder")]:
        (tmp_path / "folder.png").mkdir(exist_ok=True)
        with pytest.raises(SystemExit, match=f"--out .*{message}"):
            cli(["sample", *no_run, "--out", str(out), "a red circle"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "folder.png"]  # nothing written


def test_prompt_that_is_not_utf8_is_an_error(no_run):
    """Bytes that are not UTF-8 reach Python as lone surrogates (surrogateescape)."""
    prompt = b"a red \xff circle".decode("utf-8", "surrogateescape")
    with pytest.raises(SystemExit, match="prompt 2 .* is not valid UTF-8"):
        cli(["sample", *no_run, "a blue square", prompt])


@pytest.mark.parametrize("args, message", [
    (["--samplers", "ddim10,ddimX"], "--samplers: unknown sampler 'ddimX': expected ddimN"),
    (["--samplers", "ddim0"], "--samplers: unknown sampler 'ddim0'"),
    (["--prompts-per-kind", "0"], "--prompts-per-kind must be >= 1"),
    (["--images-per-prompt", "0"], "--images-per-prompt must be >= 1"),
    (["--guidance", "1,nan"], "--guidance must be a number in \\[0, 100\\]"),
    (["--classifier-scales", "0,inf"], "--classifier-scales must be finite numbers >= 0"),
    (["--out", "missing/eval.json"], "--out missing/eval.json: the folder missing does not exist"),
    (["--out", "eval.png"], "--out eval.png: the file name must end in .json"),
])
def test_evaluate_rejects_bad_arguments_before_loading(no_run, args, message):
    with pytest.raises(SystemExit, match=message):
        cli(["evaluate", *no_run, *args])


def test_data_command_checks_its_arguments(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli(["data", "--rows", "1", "--cols", "1", "--image-size", "32", "--out", "one.png"])
    assert (tmp_path / "one.png").stat().st_size > 500
    for args, message in [(["--rows", "0"], "--rows must be >= 1"), (["--cols", "0"], "--cols must be >= 1"),
                          (["--image-size", "8"], "--image-size must be >= 16"), (["--dpi", "0"], "--dpi must be >= 1"),
                          (["--out", "shapes.txt"], "--out shapes.txt: the file name must end in .png")]:
        with pytest.raises(SystemExit, match=message):
            cli(["data", *args])
    assert [p.name for p in tmp_path.iterdir()] == ["one.png"]


def test_grade_a_missing_submission_is_an_error(tmp_path):
    """A folder that is not there, or holds none of the files with assignment regions: one line, no grading."""
    with pytest.raises(SystemExit, match="is not a submission: no such folder"):
        course_cli(["grade", str(tmp_path / "nonexistent")])
    with pytest.raises(SystemExit, match="is not a submission of this project: it has no tinyldm/"):
        course_cli(["grade", str(tmp_path)])


def test_evaluate_output_folder_that_takes_no_file_is_an_error(no_run, monkeypatch):
    """A read-only folder (root ignores permission bits, so the file system's refusal is simulated)."""
    def refuse(*args, **kwargs):
        raise OSError(30, "Read-only file system")
    monkeypatch.setattr(tinyldm_cli.tempfile, "TemporaryFile", refuse)
    with pytest.raises(SystemExit, match="--out eval.json: cannot write into . \\(Read-only file system\\)"):
        cli(["evaluate", *no_run, "--out", "eval.json"])


def test_evaluate_lists_of_numbers_say_what_they_accept(no_run, capsys):
    with pytest.raises(SystemExit):
        cli(["evaluate", *no_run, "--guidance", "1,three"])
    assert "expected comma-separated numbers, e.g. 1,3,5; got '1,three'" in capsys.readouterr().err
