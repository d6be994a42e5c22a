"""Course assignments: marked regions of the reference code, a starter kit without them, and grading.

A region is a piece of a function body that a student writes. It is marked in the source with two
comments that name the assignment:

    def q_sample(self, x0, t, eps):
        '''...'''
        # BEGIN ASSIGNMENT 1: DDPM Eq. 4
        return ...
        # END ASSIGNMENT 1

`python -m course make OUT_DIR [--only N ...]` copies the project to OUT_DIR with the code between
the markers replaced by `raise NotImplementedError("Assignment N: ...")`, and writes
OUT_DIR/HANDOUT.md. Each test that grades an assignment carries `@pytest.mark.assignment(N)`;
`python -m course grade [DIR] [--only N ...] [--json]` runs those tests and prints a score table.
The tests without the marker check the project as a whole (training, the notebooks): they need
every assignment done, so they are not graded.

This is tooling for the repository (it reads tests/ and copies the whole tree), so it lives
beside the package, not in it.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository root (course/..)
BEGIN = re.compile(r"^(\s*)# BEGIN ASSIGNMENT (\d+)\b(.*)$")
END = re.compile(r"^(\s*)# END ASSIGNMENT (\d+)\s*$")
# never copied into a starter kit: history (it holds the solutions), run outputs, caches
SKIP = shutil.ignore_patterns(".git", "runs", "__pycache__", ".pytest_cache", ".ipynb_checkpoints", "*.pt",
                              "bench*.json", "eval*.json", ".venv", "*.egg-info", ".benchmarks", ".ruff_cache")


@dataclass(frozen=True)
class Assignment:
    number: int
    title: str
    equations: str   # Markdown with LaTeX, for the handout
    papers: str      # where the equations come from
    notebook: str    # the notebook that explains it ("" if none)


ASSIGNMENTS = (
    Assignment(1, "β schedules and the forward process",
               r"linear: $\beta_t$ evenly spaced from $\beta_\text{start}$ to $\beta_\text{end}$; scaled linear: "
               r"$\sqrt{\beta_t}$ evenly spaced; cosine: $\bar\alpha_t = f(t)/f(0)$, "
               r"$f(t) = \cos^2\!\big(\tfrac{t/T + s}{1 + s}\cdot\tfrac{\pi}{2}\big)$, $s = 0.008$, "
               r"$\beta_t = 1 - \bar\alpha_t/\bar\alpha_{t-1}$ clipped at 0.999. Forward process: "
               r"$x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\varepsilon$.",
               "Ho et al. 2020 (DDPM) Sec. 4 and Eq. 4; Nichol & Dhariwal 2021 (Improved DDPM) Eq. 17",
               "notebooks/02_noise_schedule.ipynb"),
    Assignment(2, "The posterior and the DDPM step",
               r"$q(x_{t-1}\mid x_t, x_0) = \mathcal N(\tilde\mu_t, \tilde\beta_t I)$ with "
               r"$\tilde\mu_t = \frac{\sqrt{\bar\alpha_{t-1}}\beta_t}{1-\bar\alpha_t}x_0 + "
               r"\frac{\sqrt{\alpha_t}(1-\bar\alpha_{t-1})}{1-\bar\alpha_t}x_t$, "
               r"$\tilde\beta_t = \frac{1-\bar\alpha_{t-1}}{1-\bar\alpha_t}\beta_t$; the step "
               r"$x_{t-1} = \tilde\mu_t(x_t, \hat x_0) + \sqrt{\tilde\beta_t}\,z$ with "
               r"$\hat x_0 = (x_t - \sqrt{1-\bar\alpha_t}\,\varepsilon)/\sqrt{\bar\alpha_t}$ (given: `predict_x0`).",
               "Ho et al. 2020 (DDPM) Eqs. 6, 7, 15 and Algorithm 2",
               "notebooks/05_sampling_and_guidance.ipynb"),
    Assignment(3, "The DDIM step and both guidance rules",
               r"DDIM: $x_{t'} = \sqrt{\bar\alpha_{t'}}\,\hat x_0 + \sqrt{1-\bar\alpha_{t'}-\sigma^2}\,\varepsilon"
               r" + \sigma z$, $\sigma = \eta\sqrt{\tfrac{1-\bar\alpha_{t'}}{1-\bar\alpha_t}}"
               r"\sqrt{1-\tfrac{\bar\alpha_t}{\bar\alpha_{t'}}}$. Classifier-free guidance: "
               r"$\tilde\varepsilon = \varepsilon(c_u) + s\,(\varepsilon(c) - \varepsilon(c_u))$. Classifier "
               r"guidance: $\hat\varepsilon = \varepsilon - "
               r"\gamma\sqrt{1-\bar\alpha_t}\,\nabla_{x_t}\log p(y\mid x_t)$.",
               "Song et al. 2021 (DDIM) Eqs. 12 and 16; Ho & Salimans 2022 (CFG) Eq. 6; "
               "Dhariwal & Nichol 2021 (Guided) Eqs. 11 and 14",
               "notebooks/01_guidance_from_bayes.ipynb"),
    Assignment(4, "The diagonal Gaussian, its KL and the autoencoder loss",
               r"$z = \mu + \sigma\odot\varepsilon$; $\mathrm{KL}(\mathcal N(\mu,\sigma^2)\,\|\,\mathcal N(0, I)) = "
               r"\tfrac12\sum(\mu^2 + \sigma^2 - 1 - \log\sigma^2)$; "
               r"$L = L_\text{rec} + w_\text{KL}\cdot\mathrm{KL}/(C H W)$ (the adversarial term is given).",
               "Kingma & Welling 2014 (VAE) Sec. 2.4 and App. B; Rombach et al. 2022 (LDM) Eq. 25",
               "notebooks/03_autoencoder.ipynb"),
    Assignment(5, "Attention and cross-attention",
               r"$\mathrm{softmax}(QK^\top/\sqrt d)$ over the keys, padding keys at $-\infty$; "
               r"$Q = W_Q\,\varphi(z_t)$, $K = W_K\,\tau(y)$, $V = W_V\,\tau(y)$, split into heads and merged.",
               "Vaswani et al. 2017 (Transformer) Eq. 1 and Sec. 3.2.2; Rombach et al. 2022 (LDM) Eq. 3",
               "notebooks/04_text_and_cross_attention.ipynb"),
    Assignment(6, "Timestep embedding and the ResBlock",
               r"$[\cos(t\omega_0), \dots, \cos(t\omega_{h-1}), \sin(t\omega_0), \dots]$, "
               r"$\omega_i = P^{-i/h}$; ResBlock: $h = \mathrm{conv}(\mathrm{SiLU}(\mathrm{GN}(x))) + "
               r"W\,\mathrm{SiLU}(e_t)$, out $= \mathrm{skip}(x) + \mathrm{conv}(\mathrm{SiLU}(\mathrm{GN}(h)))$.",
               "Vaswani et al. 2017 Sec. 3.5; Ho et al. 2020 App. B; Dhariwal & Nichol 2021 Sec. 3",
               ""),
    Assignment(7, "The text encoder",
               r"pre-LN blocks $x \leftarrow x + \mathrm{Attn}(\mathrm{LN}(x))$, "
               r"$x \leftarrow x + \mathrm{MLP}(\mathrm{LN}(x))$ over token plus position embeddings; "
               r"self-attention never attends to [PAD].",
               "Vaswani et al. 2017; Radford et al. 2019 (GPT-2, pre-LN)",
               "notebooks/04_text_and_cross_attention.ipynb"),
    Assignment(8, "The training loss and the sampling loops",
               r"$L_\text{simple} = \mathbb E_{t, x_0, \varepsilon}\|\varepsilon - "
               r"\varepsilon_\theta(x_t, t, c)\|^2$, $t\sim\mathcal U\{0..T-1\}$ (or the v target); DDPM "
               r"Algorithm 2 over $t = T-1 \dots 0$; DDIM over `ddim_timesteps` with $t' = -1$ last.",
               "Ho et al. 2020 (DDPM) Eq. 14 and Algorithms 1-2; Song et al. 2021 (DDIM) Sec. 4.2",
               "notebooks/05_sampling_and_guidance.ipynb"),
)
NUMBERS = tuple(a.number for a in ASSIGNMENTS)


class MarkerError(ValueError):
    """Unbalanced, nested or unknown assignment markers."""


@dataclass(frozen=True)
class Region:
    number: int      # the assignment
    path: str        # file, relative to the project root
    begin: int       # 1-based line number of the BEGIN marker
    end: int         # 1-based line number of the END marker
    indent: str      # the markers' indentation, used for the `raise`
    function: str    # the enclosing function, e.g. "NoiseSchedule.q_sample"
    note: str        # the text after the BEGIN marker's number


def _enclosing(lines, i, indent):
    """The qualified name of the function around line i, e.g. "NoiseSchedule.q_sample"."""
    names, depth = [], len(indent)
    for line in reversed(lines[:i]):
        m = re.match(r"^(\s*)(?:async\s+)?(?:def|class)\s+(\w+)", line)
        if m and len(m.group(1)) < depth:
            names.insert(0, m.group(2))
            depth = len(m.group(1))
            if depth == 0:
                break
    return ".".join(names) or "<module>"


def find_regions(text, path="<string>"):
    """Every marked region in one file's text; MarkerError if the markers are not balanced."""
    lines, regions, open_ = text.splitlines(), [], None
    for i, line in enumerate(lines):
        begin, end = BEGIN.match(line), END.match(line)
        if begin:
            if open_:
                raise MarkerError(f"{path}:{i + 1}: BEGIN ASSIGNMENT {begin.group(2)} inside the region of "
                                  f"assignment {open_[1]} opened at line {open_[0] + 1}")
            open_ = (i, int(begin.group(2)), begin.group(1), begin.group(3).lstrip(" :"))
        elif end:
            if not open_ or int(end.group(2)) != open_[1] or end.group(1) != open_[2]:
                raise MarkerError(f"{path}:{i + 1}: END ASSIGNMENT {end.group(2)} does not close an open region "
                                  "of that number at the same indentation")
            if i == open_[0] + 1:
                raise MarkerError(f"{path}:{i + 1}: the region of assignment {open_[1]} is empty")
            regions.append(Region(open_[1], path, open_[0] + 1, i + 1, open_[2],
                                  _enclosing(lines, open_[0], open_[2]), open_[3]))
            open_ = None
        elif "ASSIGNMENT" in line and re.search(r"#\s*(BEGIN|END)\s+ASSIGNMENT", line):
            raise MarkerError(f"{path}:{i + 1}: malformed marker {line.strip()!r}; write "
                              "'# BEGIN ASSIGNMENT N: note' and '# END ASSIGNMENT N' on their own lines")
    if open_:
        raise MarkerError(f"{path}:{open_[0] + 1}: BEGIN ASSIGNMENT {open_[1]} is never closed")
    for r in regions:
        if r.number not in NUMBERS:
            raise MarkerError(f"{path}:{r.begin}: unknown assignment {r.number}; known: {NUMBERS}")
    return regions


def project_regions(root=ROOT):
    """All regions in root/tinyldm/*.py, in file order; every assignment must have at least one."""
    regions = []
    for file in sorted((Path(root) / "tinyldm").glob("*.py")):
        regions += find_regions(file.read_text(), str(file.relative_to(root)))
    missing = sorted(set(NUMBERS) - {r.number for r in regions})
    if missing:
        raise MarkerError(f"assignments {missing} have no marked region in {root}/tinyldm")
    return regions


def strip_regions(text, numbers, path="<string>"):
    """text with the code of each region of an assignment in `numbers` replaced by a raise."""
    lines = text.splitlines(keepends=True)
    for r in reversed(find_regions(text, path)):  # from the bottom, so line numbers stay valid
        if r.number in numbers:
            message = f"Assignment {r.number}: write {r.function} (see HANDOUT.md)"
            lines[r.begin:r.end - 1] = [f'{r.indent}raise NotImplementedError("{message}")\n']
    return "".join(lines)


def region_id(region):
    """The region's name in a trace: "path:line" of its BEGIN marker."""
    return f"{region.path}:{region.begin}"


class RegionTracer:
    """Which regions' lines run, test by test (sys.settrace; line events only inside the marked files).

    tests/conftest.py drives it under `pytest --trace-regions FILE`; tests/test_assignments.py uses the
    record ({test id: ["path:line of a BEGIN marker", ...]}) to check that the tests of one assignment
    never run the code of another, and that every region runs in some test of its own assignment.
    """

    def __init__(self, root=ROOT):
        self.lines = {}  # real path of a marked file -> {line number inside a region: region id}
        for r in project_regions(root):
            marked = self.lines.setdefault(os.path.realpath(Path(root) / r.path), {})
            marked.update({line: region_id(r) for line in range(r.begin + 1, r.end)})
        self._paths = {}  # co_filename -> its line map, or None for unmarked files
        self.record, self._hits = {}, set()

    def _marked(self, filename):
        if filename not in self._paths:
            self._paths[filename] = self.lines.get(os.path.realpath(filename))
        return self._paths[filename]

    def _trace_call(self, frame, event, arg):
        marked = self._marked(frame.f_code.co_filename)
        if marked is None:
            return None  # no line events for frames outside the marked files

        def trace_line(frame, event, arg):
            if event == "line" and frame.f_lineno in marked:
                self._hits.add(marked[frame.f_lineno])
            return trace_line

        return trace_line

    def start(self):
        self._hits = set()
        sys.settrace(self._trace_call)

    def stop(self, key):
        sys.settrace(None)
        self.record[key] = sorted(self._hits)


# ----------------------------------------------------------------------------------------------
# make: the starter kit and its handout


def make(out_dir, only=None, root=ROOT):
    """Copy the project to out_dir without the regions of `only` (default: all); write HANDOUT.md."""
    root, out_dir = Path(root).resolve(), Path(out_dir).resolve()
    only = sorted(set(only or NUMBERS))
    unknown = sorted(set(only) - set(NUMBERS))
    if unknown:
        raise ValueError(f"unknown assignment(s) {unknown}; the assignments are {NUMBERS}")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty; choose a new folder")
    regions = project_regions(root)

    def ignore(folder, names):
        skipped = set(SKIP(folder, names))
        return skipped | {n for n in names if (Path(folder) / n).resolve() == out_dir}  # never copy into itself

    shutil.copytree(root, out_dir, ignore=ignore, dirs_exist_ok=True)
    for path in sorted({r.path for r in regions if r.number in only}):
        (out_dir / path).write_text(strip_regions((root / path).read_text(), only, path))
    regions = project_regions(out_dir)  # again, for the line numbers of the students' files
    (out_dir / "HANDOUT.md").write_text(handout(regions, only))
    return [r for r in regions if r.number in only]


def handout(regions, only):
    """The students' handout (Markdown): per assignment what to write, the maths, where to read, how to grade."""
    out = ["# tinyldm: assignments", "",
           "Each assignment is a set of marked regions in `tinyldm/` that raise `NotImplementedError`.",
           "Write the code between `# BEGIN ASSIGNMENT N` and `# END ASSIGNMENT N`; the docstrings and",
           "comments around each region say what goes in and what comes out. Grade yourself with",
           "`python -m course grade` (all) or `--only N`; the same tests run with",
           "`python -m pytest --assignment N`. The other tests (training, notebooks) need every assignment.", ""]
    for a in ASSIGNMENTS:
        if a.number not in only:
            continue
        out += [f"## Assignment {a.number}: {a.title}", "", "Write:", ""]
        out += [f"- `{r.path}`: `{r.function}` (line {r.begin}){f', {r.note}' if r.note else ''}"
                for r in regions if r.number == a.number]
        out += ["", f"The maths: {a.equations}", "", f"Read: {a.papers}."]
        if a.notebook:
            out += [f"The notebook that explains it: `{a.notebook}`."]
        out += ["", f"Grade it: `python -m course grade --only {a.number}`", ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# grade: run the marked tests, score each assignment


def grade(project_dir=ROOT, only=None, pytest_args=(), timeout=1800):
    """Run the tests of the assignments in `only` (default: all) in project_dir; a dict of results."""
    project_dir = Path(project_dir).resolve()
    if not (project_dir / "tests").is_dir():  # checked here: pytest would run elsewhere, or not start
        raise FileNotFoundError(f"{project_dir} is not a project to grade: "
                                f"{'it has no tests/ folder' if project_dir.is_dir() else 'no such folder'}")
    only = sorted(set(only or NUMBERS))
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        # only the test files that mention the marker: collecting the others (training, notebooks) is slow
        files = [str(f.relative_to(project_dir)) for f in sorted((project_dir / "tests").glob("test_*.py"))
                 if "mark.assignment(" in f.read_text()]
        command = [sys.executable, "-m", "pytest", *files, "-m", "assignment", "-q", "-p", "no:cacheprovider",
                   f"--junitxml={report}", "-o", "junit_family=xunit1",
                   *[arg for n in only for arg in ("--assignment", str(n))],
                   *pytest_args]
        done = subprocess.run(command, cwd=project_dir, capture_output=True, text=True, timeout=timeout)
        if not report.is_file():
            raise RuntimeError(f"pytest did not run in {project_dir}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
        cases = ET.parse(report).getroot().iter("testcase")
    results = {n: [] for n in only}
    errors = []
    for case in cases:
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        outcome = ("failed" if case.find("failure") is not None or case.find("error") is not None
                   else "skipped" if case.find("skipped") is not None else "passed")
        test = f"{case.get('classname')}::{case.get('name')}"
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        message = "" if problem is None else problem.get("message", "")[:300]
        if "assignment" in props:
            results[int(props["assignment"])].append({"test": test, "outcome": outcome, "message": message})
        elif outcome == "failed":  # e.g. a test file that could not be imported
            errors.append({"test": test, "message": message})
    table = []
    for a in ASSIGNMENTS:
        if a.number in only:
            tests = results[a.number]
            table.append({"number": a.number, "title": a.title, "tests": tests, "total": len(tests),
                          "passed": sum(t["outcome"] == "passed" for t in tests)})
    return {"assignments": table, "collection_errors": errors, "passed": sum(r["passed"] for r in table),
            "total": sum(r["total"] for r in table)}


def print_table(result):
    print(f"{'':>3} {'assignment':<56} {'passed':>9}")
    for r in result["assignments"]:
        mark = "ok" if r["total"] and r["passed"] == r["total"] else ""
        print(f"{r['number']:>3} {r['title']:<56} {r['passed']:>4}/{r['total']:<4} {mark}")
    print(f"{'':>3} {'total':<56} {result['passed']:>4}/{result['total']:<4}")
    for e in result["collection_errors"]:
        print(f"error (these tests were not collected, so the table misses them): {e['test']}: {e['message']}")
