"""The mutation check (course/mutations.py): every listed wrong answer fails a test of its assignment,
every listed equivalent answer passes them all, and the reference passes.

The check itself runs once, in a subprocess (`python -m course mutants --json`), and each mutant is
then one test here, so a failure names the mutant and the test that let it through (or tripped it).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import tinyldm.diffusion as diffusion
from tinyldm.diffusion import classifier_free_guidance
from course.assignments import NUMBERS, ROOT, project_regions
from course.mutations import (EQUIVALENT, MUTANTS, WRONG, assignment_test_files, mutated_code, region_of, summary,
                              swapped, target_function)

BY_NAME = {m.name: m for m in MUTANTS}


def test_the_list_names_real_regions_and_covers_them_all():
    """Names are unique; each mutant names one region and says why in one line; every region has a
    wrong mutant; every assignment has at least 3 wrong ones and an equivalent one; 30+ wrong in all."""
    regions = project_regions()
    assert len(BY_NAME) == len(MUTANTS)
    for m in MUTANTS:
        assert m.expect in (WRONG, EQUIVALENT) and m.why.strip() and "\n" not in m.why, m.name
        region_of(m, regions)  # ValueError unless exactly one region of that assignment in that function
    for r in regions:
        assert any(m.expect == WRONG and (m.number, m.function) == (r.number, r.function) for m in MUTANTS), r
    for n in NUMBERS:
        assert sum(m.expect == WRONG and m.number == n for m in MUTANTS) >= 3, n
        assert any(m.expect == EQUIVALENT and m.number == n for m in MUTANTS), n
        assert assignment_test_files(n), f"no test file marks assignment {n}"
    assert sum(m.expect == WRONG for m in MUTANTS) >= 30


def test_every_mutant_compiles_into_its_function():
    """Each mutant's code is its function's code with the region replaced: same name and arguments,
    different bytecode."""
    for m in MUTANTS:
        code, original = mutated_code(m), target_function(m).__code__
        assert code.co_name == original.co_name, m.name
        assert code.co_varnames[:code.co_argcount] == original.co_varnames[:original.co_argcount], m.name
        parts = lambda c: (c.co_code, c.co_consts, c.co_names)  # noqa: E731
        assert parts(code) != parts(original), m.name


def test_swap_reaches_every_caller_and_is_undone():
    """Inside `swapped`, a name imported beforehand, a method called on an instance and a function behind
    torch.no_grad's wrapper all run the mutant; afterwards, and after an exception, the reference again."""
    c, u = torch.ones(3), torch.zeros(3)
    schedule = diffusion.NoiseSchedule(torch.linspace(1e-4, 2e-2, 5, dtype=torch.float64))
    x0, eps = torch.ones(1, 2), torch.zeros(1, 2)
    steps = []

    def eps_fn(x_t, t):
        steps.append(t)
        return torch.zeros_like(x_t)

    def observe():
        steps.clear()
        diffusion.ddpm_sample(eps_fn, schedule, (1, 2), generator=torch.Generator().manual_seed(0))
        return (classifier_free_guidance(c, u, 2.0)[0].item(),  # a name imported before the swap
                round(schedule.q_sample(x0, 0, eps)[0, 0].item(), 3), list(steps))

    reference = (2.0, 1.0, [4, 3, 2, 1, 0])
    assert observe() == reference
    with swapped(BY_NAME["cfg-swapped"]), swapped(BY_NAME["q-sample-swapped"]):
        with swapped(BY_NAME["ddpm-sample-skips-t0"]):
            assert observe() == (-1.0, 0.01, [4, 3, 2, 1])  # ε_c + 2·(ε_u − ε_c); √(1−ᾱ_0)·x0; no t = 0
    assert observe() == reference
    with pytest.raises(ZeroDivisionError), swapped(BY_NAME["cfg-swapped"]):
        1 / 0
    assert observe() == reference


@pytest.fixture(scope="module")
def rows():
    """`python -m course mutants --json`, half of the assignments in each of two processes at once (CI has
    two cores): {(assignment, mutant): row}, the reference's row under the name "reference"."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-m", "course", "mutants", "--json", "--only", *map(str, part)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for part in (NUMBERS[0::2], NUMBERS[1::2])]
    result = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        try:
            result += json.loads(out)
        except json.JSONDecodeError:
            pytest.fail(f"the mutation check did not finish (exit {proc.returncode}):\n{out[-2000:]}{err[-3000:]}")
    print(summary(result))  # the counts, shown with -s or -rA
    return {(r["number"], r["mutant"]): r for r in result}


@pytest.mark.parametrize("number", NUMBERS)
def test_reference_passes_its_assignment(rows, number):
    """The unchanged project passes each assignment's tests, so a mutant's failure is its own."""
    row = rows[(number, "reference")]
    assert row["got"] == "passed", f"{row['test']}: {row['message']}"


@pytest.mark.parametrize("name", [m.name for m in MUTANTS if m.expect == WRONG])
def test_wrong_mutant_fails_its_assignment(rows, name):
    m = BY_NAME[name]
    row = rows[(m.number, name)]
    assert row["got"] == "failed", (f"assignment {m.number}'s tests let this mistake through: {m.why}"
                                    + (f" ({row['test']}: {row['message']})" if row["got"] == "error" else ""))
    # a failure must come from the mistake, not from a mutant that cannot run at all
    assert not row["message"].startswith(("NameError", "UnboundLocalError", "SyntaxError")), row["message"]


@pytest.mark.parametrize("name", [m.name for m in MUTANTS if m.expect == EQUIVALENT])
def test_equivalent_mutant_passes_its_assignment(rows, name):
    m = BY_NAME[name]
    row = rows[(m.number, name)]
    assert row["got"] == "passed", (f"a right answer fails assignment {m.number}: {m.why}; "
                                    f"{row['test']}: {row['message']}")


def test_command_rejects_an_unknown_assignment(capsys):
    """`python -m course mutants --only 9` stops with one line naming the known assignments."""
    from course.__main__ import main

    with pytest.raises(SystemExit) as stop:
        main(["mutants", "--only", "9"])
    assert str(stop.value) == f"error: unknown assignment(s) [9]; the assignments are {NUMBERS}"
