"""Every notebook in notebooks/ runs top to bottom (fast mode, on the session's tiny run).

Fast mode (TINYLDM_FAST=1) only shrinks sample counts and steps; the cells, and the asserts in
them that check each claim, are the same as in the committed notebooks.
"""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

import helpers  # notebooks/helpers.py (pytest.ini puts notebooks/ on the path, as Jupyter does)

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ("01_guidance_from_bayes", "02_noise_schedule", "03_autoencoder", "04_text_and_cross_attention",
         "05_sampling_and_guidance", "06_posterior_elbo_ddim", "07_unet_and_training_run", "08_editing")


def test_find_run_prefers_the_environment_then_the_best_trained_run(tmp_path, monkeypatch):
    """TINYLDM_RUN wins (and must be complete); else runs/small before runs/cpu before runs/tiny."""
    for name in ("cpu", "tiny", "half"):
        (tmp_path / name).mkdir()
        for f in ("model.json", "tokenizer.json", "model.pt")[: 2 if name == "half" else 3]:
            (tmp_path / name / f).write_text("")
    monkeypatch.setattr(helpers, "RUNS", tmp_path)
    monkeypatch.delenv("TINYLDM_RUN", raising=False)
    assert helpers.find_run(train_if_missing=False) == tmp_path / "cpu"
    monkeypatch.setenv("TINYLDM_RUN", str(tmp_path / "tiny"))
    assert helpers.find_run(train_if_missing=False) == tmp_path / "tiny"
    monkeypatch.setenv("TINYLDM_RUN", str(tmp_path / "half"))
    with pytest.raises(FileNotFoundError, match="model.pt"):
        helpers.find_run(train_if_missing=False)
    monkeypatch.delenv("TINYLDM_RUN")
    monkeypatch.setattr(helpers, "RUNS", tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="train_small"):
        helpers.find_run(train_if_missing=False)
    monkeypatch.setenv("TINYLDM_FAST", "1")
    assert helpers.fast_mode()


def test_the_course_is_complete():
    """The listed notebooks exist, and no other notebook hides in the folder untested."""
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_top_to_bottom(name, tiny_run, monkeypatch):
    """Execute every cell in a fresh kernel; any exception or failed assert in a cell fails the test."""
    path = NOTEBOOKS / f"{name}.ipynb"
    if not path.is_file():
        pytest.fail(f"{path} is missing")
    monkeypatch.setenv("TINYLDM_FAST", "1")
    monkeypatch.setenv("TINYLDM_RUN", str(tiny_run))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "agg")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    errors = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors, errors
