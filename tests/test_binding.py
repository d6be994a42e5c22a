"""scripts/binding.py: the two-object failure breakdown, and the attention selectivity on a run."""

import json

import pytest

from scripts.binding import breakdown, cell, main

TARGET = {"kind": "two", "objects": [{"colour": "red", "shape": "circle"}, {"colour": "blue", "shape": "square"}],
          "relation": "left of"}


def dets(*pairs):
    return [{"colour": c, "shape": s, "size": "large", "cx": 0.5, "cy": 0.5} for c, s in pairs]


def test_breakdown_tells_a_swap_from_a_blend():
    right = dets(("blue", "square"), ("red", "circle"))             # both pairs, in any order
    swapped = dets(("blue", "circle"), ("red", "square"))           # right colours and shapes, wrong objects
    blended = dets(("purple", "circle"), ("purple", "circle"))      # one colour twice, not in the prompt
    alone = dets(("red", "circle"))                                 # one object: not judged
    r = breakdown([TARGET] * 4, [right, swapped, blended, alone])
    assert r["images"] == 4 and r["two_found"] == 0.75
    assert r["pairs_both_right"] == pytest.approx(1 / 3) and r["swapped"] == pytest.approx(1 / 3)
    assert r["colours_both_drawn"] == pytest.approx(2 / 3) and r["shapes_both_drawn"] == pytest.approx(2 / 3)
    assert r["colour_twice"] == r["colour_not_in_prompt"] == r["shape_twice"] == pytest.approx(1 / 3)
    assert r["shape_not_in_prompt"] == 0


def test_one_colour_named_twice_drawn_twice_is_no_error():
    same = {"kind": "two", "objects": [{"colour": "red", "shape": "circle"}, {"colour": "red", "shape": "square"}],
            "relation": "above"}
    r = breakdown([same, TARGET], [dets(("red", "circle"), ("red", "square")), dets(("red", "circle"), ("red", "square"))])
    assert r["colour_twice"] == 1.0         # only TARGET, which names two colours, counts: it got red twice
    assert r["pairs_both_right"] == 0.5 and r["colours_both_drawn"] == 0.5


def test_cell_indexes_rows_then_columns():
    assert cell(0.0, 0.0, 4) == 0 and cell(0.99, 0.0, 4) == 3 and cell(0.0, 0.99, 4) == 12
    assert cell(1.0, 1.0, 4) == 15  # the edge belongs to the last cell


def test_script_on_a_run(tiny_run, tmp_path, capsys):
    out = tmp_path / "binding.json"
    main(["--run", str(tiny_run), "--prompts", "4", "--images", "8", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["samples"]["images"] == 4
    assert all(0 <= v <= 1 for k, v in report["samples"].items() if k != "images")
    layers = report["attention"]["800"]
    assert layers and all(r["pairs"] > 0 and 0 <= r["tv_objects"] <= 1 and 0 <= r["tv_control"] <= 1
                          for r in layers.values())
    assert "TV between the objects' cells" in capsys.readouterr().out


def test_bad_arguments_are_refused_before_anything_runs(tmp_path):
    with pytest.raises(SystemExit, match="no model.json"):
        main(["--run", str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match="--prompts"):
        main(["--run", str(tmp_path), "--prompts", "0"])
    with pytest.raises(SystemExit, match="--guidance"):
        main(["--run", str(tmp_path), "--guidance", "nan"])
