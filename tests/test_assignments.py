"""Meta-tests of the course assignments (course/assignments.py): markers, starter kit, grading.

The claim to prove: for each assignment N, a copy of the project with only N's regions removed
fails exactly N's tests and passes every other assignment's tests. Two runs prove it here:
  1. the reference, traced: every assignment test passes, runs the code of its own assignment's
     regions only, and every region runs in some test of its assignment;
  2. the starter kit with every region removed: every assignment test fails, on its own
     assignment's NotImplementedError.
By 1, a test of M never reaches N's code, so removing N cannot change it; by 1 and 2, each test of
N reaches only N's regions and fails without them. The literal check, one copy per assignment,
is the slow test at the end (`python -m pytest -m slow tests/test_assignments.py`).

Grading uses the instructor's tests only: the starter below carries a conftest hook that turns every
failure into a pass and a test file of its own, and its grade must still be 0 passed; a planted
instructor tree with tests/hidden/ shows that `make` leaves the hidden tests out and `grade` runs them.
"""

# the student's trick: appended to tests/conftest.py, it reports every test as passed
CHEAT_HOOK = """

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    report.outcome = "passed"
    report.longrepr = None
"""
# and a test file of the student's own, graded as assignment 1 if the grader ran it
STUDENT_TESTS = """import pytest


@pytest.mark.assignment(1)
def test_free_point():
    assert False, "fails, so only the planted hook can make it pass"
"""
# an instructor's hidden test of assignment 1, planted in a copy of the repository
HIDDEN_TEST = """import pytest

from tinyldm.diffusion import make_beta_schedule


@pytest.mark.assignment(1)
def test_linear_betas_hit_both_ends():
    betas = make_beta_schedule("linear", T=5, beta_start=0.1, beta_end=0.3)
    assert betas[0].item() == pytest.approx(0.1) and betas[-1].item() == pytest.approx(0.3)
"""
HIDDEN_ID = "tests.hidden.test_hidden_planted::test_linear_betas_hit_both_ends"

import json
import shutil
import subprocess
import sys
import textwrap
from collections import defaultdict
from pathlib import Path

import pytest

from course.__main__ import main as cli
from course.assignments import (ASSIGNMENTS, HIDDEN, INSTRUCTOR_ONLY, NUMBERS, ROOT, MarkerError, assemble, copy_ignore, find_regions,
                                grade, make, project_regions, region_id, splice, strip_regions)


def by_test(result):
    """{test id: (assignment, outcome, message)} from a grade() result."""
    return {t["test"]: (a["number"], t["outcome"], t["message"]) for a in result["assignments"] for t in a["tests"]}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """grade() of the reference, with the region tracer on: (result, {test: [region ids]})."""
    trace = tmp_path_factory.mktemp("trace") / "regions.json"
    result = grade(ROOT, pytest_args=["--trace-regions", str(trace)])
    record = json.loads(trace.read_text())
    return result, {f"{node.split('::')[0][:-3].replace('/', '.')}::{node.split('::', 1)[1]}": hits
                    for node, hits in record.items()}


@pytest.fixture(scope="module")
def instructor(tmp_path_factory):
    """A copy of the repository with one more hidden test, tests/hidden/test_hidden_planted.py, test data
    (tests/golden_planted.pt) and a run output (runs/x/model.pt)."""
    tree = tmp_path_factory.mktemp("instructor") / "project"
    shutil.copytree(ROOT, tree, ignore=copy_ignore(ROOT))
    (tree / HIDDEN).mkdir(exist_ok=True)
    (tree / HIDDEN / "test_hidden_planted.py").write_text(HIDDEN_TEST)
    (tree / "tests" / "golden_planted.pt").write_bytes(b"data")
    (tree / "runs" / "x").mkdir(parents=True)
    (tree / "runs" / "x" / "model.pt").write_bytes(b"weights")
    return tree


@pytest.fixture(scope="module")
def starter(tmp_path_factory, instructor):
    """The starter kit with every assignment removed, handed in by a student who cheats (the hook above in
    tests/conftest.py and in a new conftest.py at the top, a test file of their own), and its grade with
    the instructor's tests: the planted copy of the repository, hidden test included."""
    out = tmp_path_factory.mktemp("kit") / "starter"
    regions = make(out)
    with open(out / "tests" / "conftest.py", "a") as f:
        f.write(CHEAT_HOOK)
    (out / "conftest.py").write_text("import pytest\n" + CHEAT_HOOK)
    (out / "tests" / "test_student_extra.py").write_text(STUDENT_TESTS)
    return out, regions, grade(out, tests=instructor)


def test_reference_markers_are_balanced_and_cover_every_assignment():
    """Every assignment has regions; each names a function defined in its file; regions do not overlap."""
    regions = project_regions()
    assert {r.number for r in regions} == set(NUMBERS)
    for r in regions:
        source = (ROOT / r.path).read_text()
        assert f"def {r.function.split('.')[-1]}(" in source, r
        assert r.end > r.begin + 1
    spans = sorted((r.path, r.begin, r.end) for r in regions)
    assert all(a[0] != b[0] or a[2] < b[1] for a, b in zip(spans, spans[1:]))


@pytest.mark.parametrize("text, error", [
    ("# BEGIN ASSIGNMENT 1\nx = 1\n", "never closed"),
    ("x = 1\n# END ASSIGNMENT 1\n", "does not close"),
    ("# BEGIN ASSIGNMENT 1\n# BEGIN ASSIGNMENT 2\nx = 1\n# END ASSIGNMENT 2\n# END ASSIGNMENT 1\n", "inside"),
    ("# BEGIN ASSIGNMENT 1\nx = 1\n# END ASSIGNMENT 2\n", "does not close"),
    ("    # BEGIN ASSIGNMENT 1\n    x = 1\n# END ASSIGNMENT 1\n", "same indentation"),
    ("# BEGIN ASSIGNMENT 1\n# END ASSIGNMENT 1\n", "empty"),
    ("# BEGIN ASSIGNMENT 99\nx = 1\n# END ASSIGNMENT 99\n", "unknown assignment"),
    ("# BEGIN ASSIGNMENT one\nx = 1\n", "malformed"),
])
def test_unbalanced_markers_are_errors(text, error):
    """Markers must pair up: same number, same indentation, no nesting, nothing empty, known numbers."""
    with pytest.raises(MarkerError, match=error):
        find_regions(text)


def test_strip_regions_replaces_only_the_chosen_assignments():
    """The code between the markers becomes one raise naming the assignment and function; the markers,
    the docstring and the other assignments' code stay; the result still compiles."""
    source = textwrap.dedent('''
        class Model:
            def step(self, x):
                """Docstring stays."""
                y = x + 1
                # BEGIN ASSIGNMENT 2: the step
                y = y * 2
                return y
                # END ASSIGNMENT 2


        def other(x):
            # BEGIN ASSIGNMENT 3
            return -x
            # END ASSIGNMENT 3
        ''')
    (step, other) = find_regions(source)
    assert (step.number, step.function, step.note) == (2, "Model.step", "the step")
    assert (other.number, other.function) == (3, "other")
    stripped = strip_regions(source, {2})
    namespace = {}
    exec(compile(stripped, "<stripped>", "exec"), namespace)
    with pytest.raises(NotImplementedError, match="Assignment 2: write Model.step"):
        namespace["Model"]().step(1)
    assert namespace["other"](4) == -4
    assert '"""Docstring stays."""' in stripped and "y = x + 1" in stripped and "y * 2" not in stripped
    assert [r.number for r in find_regions(stripped)] == [2, 3]  # markers kept, still balanced


def test_reference_passes_every_assignment(reference):
    """The reference code passes all the tests of every assignment, and every assignment has tests."""
    result, _ = reference
    assert not result["collection_errors"]
    for a in result["assignments"]:
        assert a["total"] > 0 and a["passed"] == a["total"], a


def test_each_assignments_tests_run_only_its_own_regions(reference):
    """Traced: a test of assignment N runs code in N's regions only (so removing another assignment cannot
    change it), it does reach one of N's regions, and every region runs in some test of its assignment."""
    result, traced = reference
    number_of = {region_id(r): r.number for r in project_regions()}
    reached = defaultdict(set)
    for test, (number, _, _) in by_test(result).items():
        hits = traced[test]
        assert {number_of[h] for h in hits} == {number}, (test, number, hits)
        reached[number] |= set(hits)
    for region, number in number_of.items():
        assert region in reached[number], f"region {region} (assignment {number}) is run by none of its tests"


def test_starter_fails_every_test_on_its_own_assignment(reference, starter):
    """With every region removed, each assignment test fails with its own assignment's NotImplementedError,
    and the grader finds the same tests as in the reference, plus the planted hidden one (nothing fails to
    import). The student's hook and test file change nothing: 0 passed, and their test is not graded."""
    _, _, result = starter
    assert not result["collection_errors"]
    reference_tests, starter_tests = by_test(reference[0]), by_test(result)
    assert set(starter_tests) == set(reference_tests) | {HIDDEN_ID}
    assert result["passed"] == 0 and result["total"] == reference[0]["total"] + 1
    for test, (number, outcome, message) in starter_tests.items():
        assert outcome == "failed" and f"Assignment {number}:" in message, (test, outcome, message)
    assert not result["notes"]  # the starter's code outside the regions is the instructor's


def test_grade_runs_the_hidden_tests(starter):
    """The planted hidden test is graded under its assignment: it ran the student's code, which raised."""
    number, outcome, message = by_test(starter[2])[HIDDEN_ID]
    assert (number, outcome) == (1, "failed") and "Assignment 1: write make_beta_schedule" in message


def test_the_planted_hook_works_where_the_students_tests_run(starter, tmp_path):
    """The control: where pytest runs the student's conftest.py, the hook above turns their failing test into a
    pass. So the grade of 0 passed is the grader ignoring the hook, not a hook that does nothing."""
    out, _, _ = starter
    for name in ("conftest.py", "tests/test_student_extra.py"):
        shutil.copy(out / name, tmp_path / Path(name).name)
    done = subprocess.run([sys.executable, "-m", "pytest", "test_student_extra.py", "-q", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout + done.stderr


def test_grading_assembles_the_instructors_tree_with_the_students_regions(starter, tmp_path):
    """assemble(): every file of the graded tree is the instructor's (tests/, both conftests, pytest.ini),
    except the marked files, which hold the submission's regions; the student's extra files are absent."""
    out, regions, _ = starter
    tree = tmp_path / "tree"
    assert assemble(out, ROOT, tree) == []
    for path in ("tests/conftest.py", "pytest.ini", "tests/test_diffusion.py"):
        assert (tree / path).read_bytes() == (ROOT / path).read_bytes(), path
    assert not (tree / "conftest.py").exists() and not (tree / "tests" / "test_student_extra.py").exists()
    for path in {r.path for r in regions}:
        assert (tree / path).read_text() == (out / path).read_text(), path


def test_splice_takes_the_regions_and_reports_the_rest():
    """splice(): region bodies come from the submission, matched by (assignment, function); the code around
    them stays the reference's, and each change outside, missing region or broken marker is a note."""
    reference = textwrap.dedent('''
        def helper(x):
            return x


        def step(x):
            # BEGIN ASSIGNMENT 2
            raise NotImplementedError
            # END ASSIGNMENT 2


        def other(x):
            # BEGIN ASSIGNMENT 3
            raise NotImplementedError
            # END ASSIGNMENT 3
        ''')
    submitted = reference.replace("return x", "return 99").replace(
        "# BEGIN ASSIGNMENT 2\n    raise NotImplementedError",
        "# BEGIN ASSIGNMENT 2\n    y = helper(x)\n    return 2 * y")
    namespace = {}
    text, notes = splice(reference, submitted, "m.py")
    exec(compile(text, "m.py", "exec"), namespace)
    assert namespace["step"](3) == 6 and namespace["helper"](3) == 3  # the region is theirs, helper ours
    assert notes == ["m.py: 1 changed line(s) outside the assignment regions; "
                     "the grade uses the instructor's code there"]
    lacking = submitted.replace("# BEGIN ASSIGNMENT 3", "").replace("# END ASSIGNMENT 3", "")
    text, notes = splice(reference, lacking, "m.py")
    assert "return 2 * y" in text and 'NotImplementedError("Assignment 3: write other' in text
    assert any("no region of assignment 3 in other" in n for n in notes)
    broken = submitted.replace("# END ASSIGNMENT 2", "")
    text, notes = splice(reference, broken, "m.py")
    assert "return 2 * y" not in text and 'NotImplementedError("Assignment 2: write step' in text
    assert len(notes) == 1 and "graded as not written" in notes[0]


def test_make_leaves_the_hidden_tests_out(starter, instructor, tmp_path):
    """The starter of a project with tests/hidden/ has no tests/hidden/ (and this repository's has none), and
    no mutation check (its list holds a right answer to every region); it keeps the tests' data, and leaves
    run outputs out. The grading tree keeps all but the run outputs."""
    assert list((instructor / HIDDEN).glob("test_hidden_*.py"))
    assert all((instructor / p).exists() for p in INSTRUCTOR_ONLY)
    make(tmp_path / "kit", root=instructor)
    assert not any((tmp_path / "kit" / p).exists() for p in INSTRUCTOR_ONLY)
    assert (tmp_path / "kit" / "tests" / "conftest.py").is_file()
    assert (tmp_path / "kit" / "tests" / "golden_planted.pt").is_file() and not (tmp_path / "kit" / "runs").exists()
    assert not (starter[0] / HIDDEN).exists()
    assemble(tmp_path / "kit", instructor, tmp_path / "tree")
    assert (tmp_path / "tree" / HIDDEN / "test_hidden_planted.py").read_text() == HIDDEN_TEST
    assert (tmp_path / "tree" / "tests" / "golden_planted.pt").is_file() and not (tmp_path / "tree" / "runs").exists()


def test_starter_kit_imports_cleanly_and_has_a_handout(starter):
    """The starter kit imports (every module of tinyldm/ and course/, the top-level scripts such as
    train_small, and the notebooks' helpers), holds no history or run outputs, and its handout lists
    each assignment with its functions, equations, notebook and grading command."""
    out, regions, _ = starter
    modules = sorted({f"{folder}.{p.stem}" for folder in ("tinyldm", "course") for p in (out / folder).glob("*.py")
                      if p.stem != "__init__"} | {p.stem for p in out.glob("*.py")} | {"helpers"})
    assert {"tinyldm.diffusion", "tinyldm.ldm", "tinyldm.evaluate", "course.assignments", "train_small", "bench"} <= set(modules)
    imports = f"import sys; sys.path.insert(0, 'notebooks'); import {', '.join(modules)}"
    done = subprocess.run([sys.executable, "-c", imports], cwd=out, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not (out / ".git").exists() and not (out / "runs").exists()
    assert len(regions) == len(project_regions()) and all(r.number in NUMBERS for r in regions)
    handout = (out / "HANDOUT.md").read_text()
    for n in NUMBERS:
        assert f"## Assignment {n}:" in handout and f"grade --only {n}`" in handout
    for r in regions:
        assert f"`{r.function}` (line {r.begin})" in handout
        assert "NotImplementedError" in (out / r.path).read_text().splitlines()[r.begin]
    for a in ASSIGNMENTS:
        assert a.notebooks and all(f"- `{path}`: " in handout for path, _ in a.notebooks)
        assert all((out / path).is_file() for path, _ in a.notebooks)  # the notebooks it points to exist
    assert "## Conventions" in handout and "f(t+1)/f(0)" in handout and "t_prev = -1" in handout
    assert "LDM) Eq. 3" not in handout  # the attention formula is unnumbered in the LDM paper
    assert "$s$ is the classifier-free guidance scale" in handout and r"$\gamma$ the classifier-guidance scale" in handout


def test_make_only_some_assignments_leaves_the_rest(tmp_path):
    """--only 3 5 removes the regions of 3 and 5; files without them are byte-identical to the reference."""
    removed = make(tmp_path / "kit", only=[3, 5])
    assert {r.number for r in removed} == {3, 5}
    for path in ("tinyldm/diffusion.py", "tinyldm/unet.py", "tinyldm/autoencoder.py", "tinyldm/text_encoder.py"):
        left = {r.number for r in find_regions((tmp_path / "kit" / path).read_text())}
        text = (tmp_path / "kit" / path).read_text()
        assert ("NotImplementedError(\"Assignment 3" in text) == (3 in left)
        assert ("NotImplementedError(\"Assignment 5" in text) == (5 in left)
        if not left & {3, 5}:
            assert text == (ROOT / path).read_text()
    assert "## Assignment 3:" in (tmp_path / "kit" / "HANDOUT.md").read_text()
    assert "## Assignment 1:" not in (tmp_path / "kit" / "HANDOUT.md").read_text()


def test_command_line_errors(tmp_path, capsys):
    """Unknown assignments and a non-empty output folder are clear errors, not tracebacks."""
    with pytest.raises(SystemExit, match="unknown assignment"):
        cli(["make", str(tmp_path / "kit"), "--only", "9"])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    with pytest.raises(SystemExit, match="not empty"):
        cli(["make", str(tmp_path / "full")])
    with pytest.raises(SystemExit, match="unknown assignment"):
        cli(["grade", "--only", "0"])
    with pytest.raises(SystemExit, match="not a submission: no such folder"):
        cli(["grade", str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match="not an instructor's project"):
        cli(["grade", str(ROOT), "--tests", str(tmp_path / "full")])
    (tmp_path / "full" / "tinyldm").mkdir()
    with pytest.raises(SystemExit, match="not a submission of this project: it has no tinyldm/"):
        cli(["grade", str(tmp_path / "full")])


@pytest.mark.slow
@pytest.mark.parametrize("n", NUMBERS)
def test_removing_one_assignment_fails_exactly_its_tests(n, reference, tmp_path):
    """The literal claim, one copy per assignment: without N, N's tests all fail and every other test passes."""
    make(tmp_path / "kit", only=[n])
    result = by_test(grade(tmp_path / "kit"))
    assert set(result) == set(by_test(reference[0]))
    for test, (number, outcome, message) in result.items():
        assert outcome == ("failed" if number == n else "passed"), (test, outcome, message)
