"""The starter's tests must not hand out the answers.

`python -m course make` copies tests/ into the starter kit (all but the instructor's files: tests/hidden/
and the mutation check).
A test that writes a marked region's code out again, as a "reference", gives the student the
solution. So: every key line of every region (a statement of the reference code, comments and
whitespace removed) must appear in no test file the starter gets. Trivial statements (`return x`,
anything under MIN_CHARS characters once normalised) are not key lines: they say nothing.
Reads the files only: no make, no subprocess.
"""

import io
import tokenize
from pathlib import Path

import pytest

from course.assignments import INSTRUCTOR_ONLY, ROOT, project_regions

MIN_CHARS = 15  # a normalised statement shorter than this (e.g. `returnemb`) gives nothing away
LEFT_OUT = [ROOT / p for p in INSTRUCTOR_ONLY]  # tests/hidden/ and the mutation check: the starter does not get them


def statements(source):
    """The logical lines of Python source, each with comments and all whitespace removed.

    A statement split over several physical lines (open brackets) is one logical line.
    """
    out, current = [], []
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    try:
        for tok in tokens:
            if tok.type == tokenize.COMMENT or tok.type in (tokenize.NL, tokenize.INDENT, tokenize.DEDENT):
                continue
            if tok.type in (tokenize.NEWLINE, tokenize.ENDMARKER):
                if current:
                    out.append("".join(current))
                current = []
                continue
            current.append("".join(tok.string.split()))
    except (tokenize.TokenError, IndentationError):  # a region's body alone may not tokenize to the end
        pass
    if current:
        out.append("".join(current))
    return out


def key_lines(region):
    """The region's statements that would give the answer away, normalised."""
    lines = (ROOT / region.path).read_text().splitlines(keepends=True)[region.begin:region.end - 1]
    body = "".join(lines)
    indent = min((len(x) - len(x.lstrip()) for x in lines if x.strip()), default=0)
    body = "".join(x[indent:] if x.strip() else "\n" for x in lines)  # dedented, so that it tokenizes
    return [s for s in statements(body) if len(s) >= MIN_CHARS]


def starter_test_files():
    """Every .py file under tests/ that the starter gets: all but tests/hidden/ and the mutation check."""
    return sorted(p for p in (ROOT / "tests").rglob("*.py") if "__pycache__" not in p.parts
                  and not any(p == left or left in p.parents for left in LEFT_OUT))


def test_statements_are_normalised_logical_lines():
    """The normaliser joins bracketed continuation lines, drops comments and whitespace."""
    source = "x = (a +\n     b)  # a comment\nif x:\n    return  f( x ,1)\n"
    assert statements(source) == ["x=(a+b)", "ifx:", "returnf(x,1)"]


def test_every_region_has_key_lines():
    """Each region says something (else the check below would check nothing)."""
    for region in project_regions():
        assert key_lines(region), f"{region.path}:{region.begin} ({region.function}) has no key line"


def test_starter_tests_contain_no_region_code():
    """No key line of any region appears (whitespace-normalised) in a test file the starter gets."""
    files = {p: statements(p.read_text()) for p in starter_test_files()}
    assert ROOT / "tests" / "conftest.py" in files
    found = []
    for region in project_regions():
        for key in key_lines(region):
            for path, lines in files.items():
                if any(key in line for line in lines):
                    found.append(f"{path.relative_to(ROOT)} holds `{key}` of {region.function} "
                                 f"({region.path}:{region.begin}, assignment {region.number})")
    assert not found, "the starter's tests hand out reference code:\n" + "\n".join(found)


def test_the_check_finds_a_planted_answer():
    """Each region's code, pasted into a test function with other spacing and comments, is caught: the
    check can fail (what is planted is read from the regions, not written out here)."""
    for region in project_regions():
        lines = (ROOT / region.path).read_text().splitlines()[region.begin:region.end - 1]
        pasted = "".join(f"    {x.replace(', ', ' ,  ')}  # pasted\n" for x in lines)
        found = statements("def test_pasted():\n" + pasted)
        assert all(any(key in line for line in found) for key in key_lines(region)), region.function
