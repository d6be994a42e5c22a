"""Course assignments: marked regions of the reference code, a starter kit without them, and grading.

A region is a piece of a function body that a student writes. It is marked in the source with two
comments that name the assignment:

    def q_sample(self, x0, t, eps):
        '''...'''
        # BEGIN ASSIGNMENT 1: DDPM Eq. 4
        return ...
        # END ASSIGNMENT 1

`python -m course make OUT_DIR [--only N ...]` copies the project to OUT_DIR with the code between
the markers replaced by `raise NotImplementedError("Assignment N: ...")`, leaves the hidden tests
(tests/hidden/) out, and writes OUT_DIR/HANDOUT.md. Each test that grades an assignment carries
`@pytest.mark.assignment(N)`; the tests without the marker check the project as a whole (training,
the notebooks): they need every assignment done, so they are not graded.

`python -m course grade SUBMISSION [--tests INSTRUCTOR_PROJECT] [--only N ...] [--json]` grades with
the instructor's tests, never the submission's:
  1. a fresh temporary tree is made from INSTRUCTOR_PROJECT (default: this repository): its tinyldm/,
     tests/ with tests/hidden/, conftest.py, pytest.ini and every other file;
  2. into it goes only the code between the markers of SUBMISSION's marked files (the tinyldm/*.py
     files with regions), region by region; everything else the submission holds (its tests/,
     conftest.py, pytest.ini, new files, code outside the markers) is not read, and where its code
     outside the markers differs from the instructor's the result says so (the grade uses the
     instructor's);
  3. pytest runs there on the instructor's test files that carry the marker (tests/ and tests/hidden/),
     with the instructor's pytest.ini, plugin autoload off, no cache and PYTEST_* variables unset.

Trust model: grading runs the student's code, and that code can do anything the grading user can:
read the hidden tests, patch pytest when it is imported, rewrite the report, open the network.
Step 2 stops the honest mistakes and the cheap tricks (a conftest hook that turns failures into
passes has no effect), not a determined attacker. Grade untrusted submissions in a sandbox: a
container with no network, the instructor's project mounted read-only, run as a separate user
with nothing else to read, and a time limit. Even there the student's code runs beside the hidden
tests and writes the failure messages: to keep those tests hidden, show students scores only.

This is tooling for the repository (it reads tests/ and copies the whole tree), so it lives
beside the package, not in it.
"""

import difflib
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
# never copied into a starter kit or a grading tree: history (it holds the solutions), run outputs, caches
SKIP = shutil.ignore_patterns(".git", "runs", "__pycache__", ".pytest_cache", ".ipynb_checkpoints", "*.pt",
                              "bench*.json", "eval*.json", ".venv", "*.egg-info", ".benchmarks", ".ruff_cache")
TEST_DATA = ("*.pt", "*.json")  # ... except that files of these kinds under tests/ are the tests' data


def copy_ignore(root, leave_out=()):
    """An `ignore` for shutil.copytree(root, ...): SKIP, except the tests' data files, and the paths in leave_out."""
    root, leave_out = Path(root).resolve(), {Path(p).resolve() for p in leave_out}

    def ignore(folder, names):
        folder = Path(folder).resolve()
        skipped = set(SKIP(folder, names))
        if folder == root / "tests" or root / "tests" in folder.parents:
            skipped -= {n for n in skipped if (folder / n).is_file() and any(Path(n).match(p) for p in TEST_DATA)}
        return skipped | {n for n in names if folder / n in leave_out}

    return ignore


@dataclass(frozen=True)
class Assignment:
    number: int
    title: str
    equations: str        # Markdown with LaTeX, for the handout
    papers: str           # where the equations come from
    notebooks: tuple      # the notebooks that explain it: ((path, what to read there), ...)


ASSIGNMENTS = (
    Assignment(1, "β schedules and the forward process",
               r"linear: $\beta_t$ evenly spaced from $\beta_\text{start}$ ($t = 0$) to $\beta_\text{end}$ "
               r"($t = T-1$); scaled linear: $\sqrt{\beta_t}$ evenly spaced from $\sqrt{\beta_\text{start}}$ to "
               r"$\sqrt{\beta_\text{end}}$; cosine, in code steps: $\bar\alpha_t = f(t+1)/f(0)$ with "
               r"$f(u) = \cos^2\!\big(\tfrac{u/T + 0.008}{1.008}\cdot\tfrac{\pi}{2}\big)$ (the paper's offset "
               r"$s = 0.008$, not the guidance scale), then $\beta_t = 1 - \bar\alpha_t/\bar\alpha_{t-1}$ "
               r"($\bar\alpha_{-1} = 1$) clipped at 0.999; each schedule a float64 tensor $(T,)$. "
               r"Forward process: $x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\varepsilon$, "
               r"$\bar\alpha_t = \prod_{i=0}^{t}(1-\beta_i)$ (the buffer `alpha_bars`).",
               "Ho et al. 2020 (DDPM) Sec. 4 and Eq. 4; Nichol & Dhariwal 2021 (Improved DDPM) Eq. 17 and Sec. 3.2",
               (("notebooks/02_noise_schedule.ipynb", "the three schedules, ᾱ_t and log-SNR, q_sample's moments"),)),
    Assignment(2, "The posterior and the DDPM step",
               r"$q(x_{t-1}\mid x_t, x_0) = \mathcal N(\tilde\mu_t, \tilde\beta_t I)$ with "
               r"$\tilde\mu_t = \frac{\sqrt{\bar\alpha_{t-1}}\,\beta_t}{1-\bar\alpha_t}x_0 + "
               r"\frac{\sqrt{\alpha_t}\,(1-\bar\alpha_{t-1})}{1-\bar\alpha_t}x_t$ and "
               r"$\tilde\beta_t = \frac{1-\bar\alpha_{t-1}}{1-\bar\alpha_t}\beta_t$, computed from the buffers "
               r"`betas`, `alphas`, `alpha_bars`, `alpha_bars_prev` ($\bar\alpha_{t-1}$, with $\bar\alpha_{-1} = 1$) "
               r"through `self._gather(values, t, x)`. The step: "
               r"$x_{t-1} = \tilde\mu_t(x_t, \hat x_0) + \sqrt{\tilde\beta_t}\,z$ with "
               r"$\hat x_0 = (x_t - \sqrt{1-\bar\alpha_t}\,\varepsilon)/\sqrt{\bar\alpha_t}$ (given: `predict_x0`); "
               r"at $t = 0$, $\tilde\beta_0 = 0$, so the last step adds no noise.",
               "Ho et al. 2020 (DDPM) Eqs. 6, 7, 15 and Algorithm 2",
               (("notebooks/06_posterior_elbo_ddim.ipynb", "the posterior derived by completing the square, "
                "checked numerically"),)),
    Assignment(3, "The DDIM step and both guidance rules",
               r"DDIM from $t$ to any earlier $t' < t$ (`t_prev`; $t' = -1$ means $\bar\alpha_{t'} = 1$, the data): "
               r"$x_{t'} = \sqrt{\bar\alpha_{t'}}\,\hat x_0 + \sqrt{1-\bar\alpha_{t'}-\sigma^2}\,\varepsilon"
               r" + \sigma z$ with $\hat x_0$ as in assignment 2 and $\sigma = \eta\sqrt{\tfrac{1-\bar\alpha_{t'}}"
               r"{1-\bar\alpha_t}}\sqrt{1-\tfrac{\bar\alpha_t}{\bar\alpha_{t'}}}$; $\eta = 0$ draws no noise. "
               r"Classifier-free guidance: $\tilde\varepsilon = \varepsilon(c_u) + s\,(\varepsilon(c) - "
               r"\varepsilon(c_u))$ (the paper writes $(1+w)\,\varepsilon(c) - w\,\varepsilon(c_u)$: $s = 1 + w$). "
               r"Classifier guidance with scale $\gamma$: $\hat\varepsilon = \varepsilon - \gamma\sqrt{1-\bar\alpha_t}\,"
               r"\nabla_{x_t}\log p(y\mid x_t)$ (given: `eps_from_score`, $\varepsilon = "
               r"-\sqrt{1-\bar\alpha_t}\,\nabla_{x_t}\log p(x_t)$).",
               "Song et al. 2021 (DDIM) Eqs. 12 and 16 (DDIM writes α for ᾱ); Ho & Salimans 2022 (CFG) Eq. 6; "
               "Dhariwal & Nichol 2021 (Guided) Eqs. 11 and 14 and Algorithm 2",
               (("notebooks/06_posterior_elbo_ddim.ipynb", "DDIM derived, what η means, the ODE view"),
                ("notebooks/01_guidance_from_bayes.ipynb", "both guidance rules from Bayes' rule"))),
    Assignment(4, "The diagonal Gaussian, its KL and the autoencoder loss",
               r"$z = \mu + \sigma\odot\varepsilon$, $\varepsilon \sim \mathcal N(0, I)$ from the generator; "
               r"$\mathrm{KL}(\mathcal N(\mu,\sigma^2)\,\|\,\mathcal N(0, I)) = "
               r"\tfrac12\sum(\mu^2 + \sigma^2 - 1 - \log\sigma^2)$, summed over every dimension but the batch, "
               r"in float32: shape $(B,)$; "
               r"$L = L_\text{rec} + w_\text{KL}\cdot\overline{\mathrm{KL}}/(C H W)$ with $\overline{\mathrm{KL}}$ "
               r"the batch mean (given: `kl_loss`) and $C H W$ the size of one input image "
               r"(the adversarial term is given).",
               "Kingma & Welling 2014 (VAE) Sec. 2.4 and App. B; Rombach et al. 2022 (LDM) App. G, Eq. 25",
               (("notebooks/03_autoencoder.ipynb", "the diagonal Gaussian, its KL, the KL weight"),)),
    Assignment(5, "Attention and cross-attention",
               r"$\mathrm{softmax}(QK^\top/\sqrt d)$ over the keys (the last axis), in float32, padding keys "
               r"(mask False) at $-\infty$; $Q = W_Q\,\varphi(z_t)$, $K = W_K\,\tau(y)$, $V = W_V\,\tau(y)$ "
               r"(self-attention when there is no context: $K$ and $V$ from $\varphi(z_t)$), split into heads "
               r"$(B, \text{heads}, \text{tokens}, d)$ and merged back.",
               "Vaswani et al. 2017 (Transformer) Eq. 1 and Sec. 3.2.2; Rombach et al. 2022 (LDM) Sec. 3.3, "
               "the attention formula (unnumbered)",
               (("notebooks/04_text_and_cross_attention.ipynb", "cross-attention, its maps per token"),)),
    Assignment(6, "Timestep embedding and the ResBlock",
               r"$[\cos(t\omega_0), \dots, \cos(t\omega_{k-1}), \sin(t\omega_0), \dots, \sin(t\omega_{k-1})]$ "
               r"with $\omega_i = P^{-i/k}$, $k = \lfloor \text{dim}/2 \rfloor$, $P$ = `max_period` (10000), and "
               r"one zero column more when dim is odd; "
               r"ResBlock: $h = \mathrm{conv}(\mathrm{SiLU}(\mathrm{GN}(x))) + W\,\mathrm{SiLU}(e_t)$ (one shift "
               r"per channel), out $= \mathrm{skip}(x) + "
               r"\mathrm{conv}(\mathrm{dropout}(\mathrm{SiLU}(\mathrm{GN}(h))))$; with `scale_shift` (AdaGN) "
               r"$[s, b] = W\,\mathrm{SiLU}(e_t)$ ($s$ the first half of the channels), "
               r"$h = \mathrm{conv}(\mathrm{SiLU}(\mathrm{GN}(x)))$ "
               r"and out $= \mathrm{skip}(x) + \mathrm{conv}(\mathrm{dropout}(\mathrm{SiLU}("
               r"\mathrm{GN}(h)\,(1 + s) + b)))$.",
               "Vaswani et al. 2017 Sec. 3.5; Ho et al. 2020 (DDPM) App. B; Dhariwal & Nichol 2021 (Guided) Sec. 3",
               (("notebooks/07_unet_and_training_run.ipynb", "the U-Net, the timestep embedding and the ResBlocks, "
                "with the shapes at every level"),)),
    Assignment(7, "The text encoder",
               r"token plus position embeddings, then pre-LN blocks $x \leftarrow x + \mathrm{Attn}(\mathrm{LN}(x))$, "
               r"$x \leftarrow x + \mathrm{MLP}(\mathrm{LN}(x))$, then a final LayerNorm; multi-head "
               r"self-attention $\mathrm{softmax}(QK^\top/\sqrt d)\,V$ that never attends to [PAD] keys.",
               "Vaswani et al. 2017 (Transformer) Eq. 1 and Sec. 3.2.2; Radford et al. 2019 (GPT-2) Sec. 2.3 "
               "(pre-LN and the final LayerNorm)",
               (("notebooks/04_text_and_cross_attention.ipynb", "the tokenizer and the text encoder's context"),)),
    Assignment(8, "The training loss and the sampling loops",
               r"$L_\text{simple} = \mathbb E_{t, x_0, \varepsilon}\|\varepsilon - "
               r"\varepsilon_\theta(x_t, t, c)\|^2$ with $t\sim\mathcal U\{0, \dots, T-1\}$ a $(B,)$ LongTensor "
               r"(given: `draw_t_and_eps`), or the target $v = \sqrt{\bar\alpha_t}\,\varepsilon - "
               r"\sqrt{1-\bar\alpha_t}\,x_0$; DDPM Algorithm 2 over $t = T-1, \dots, 0$ (python ints); DDIM over "
               r"`ddim_timesteps` with $t' = -1$ after the last; the callback before each step.",
               "Ho et al. 2020 (DDPM) Eq. 14 and Algorithms 1-2; Song et al. 2021 (DDIM) Sec. 4.2; "
               "Salimans & Ho 2022 (v-prediction) Sec. 4",
               (("notebooks/06_posterior_elbo_ddim.ipynb", "the ELBO and how it reduces to the simple ε loss, "
                "v-prediction"),
                ("notebooks/05_sampling_and_guidance.ipynb", "the sampling loops, DDPM against DDIM"))),
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
            lines[r.begin:r.end - 1] = [_raise_line(r)]
    return "".join(lines)


def _raise_line(region):
    """The line that stands for a region not written: a raise naming the assignment and the function."""
    message = f"Assignment {region.number}: write {region.function} (see HANDOUT.md)"
    return f'{region.indent}raise NotImplementedError("{message}")\n'


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

HIDDEN = Path("tests") / "hidden"  # the instructor's hidden tests: graded, never copied into a starter
# instructor-only files, never copied into a starter either: the mutation check's list holds a right answer
# to every region (its "equivalent" mutants), and its test runs that list
INSTRUCTOR_ONLY = (HIDDEN, Path("course") / "mutations.py", Path("tests") / "test_mutations.py")


def make(out_dir, only=None, root=ROOT):
    """Copy the project to out_dir without the regions of `only` (default: all) and without the
    instructor-only files (INSTRUCTOR_ONLY: tests/hidden/, the mutation check); write HANDOUT.md."""
    root, out_dir = Path(root).resolve(), Path(out_dir).resolve()
    only = sorted(set(only or NUMBERS))
    unknown = sorted(set(only) - set(NUMBERS))
    if unknown:
        raise ValueError(f"unknown assignment(s) {unknown}; the assignments are {NUMBERS}")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty; choose a new folder")
    regions = project_regions(root)

    ignore = copy_ignore(root, leave_out=(*(root / p for p in INSTRUCTOR_ONLY), out_dir))  # never into itself
    shutil.copytree(root, out_dir, ignore=ignore, dirs_exist_ok=True)
    for path in sorted({r.path for r in regions if r.number in only}):
        (out_dir / path).write_text(strip_regions((root / path).read_text(), only, path))
    regions = project_regions(out_dir)  # again, for the line numbers of the students' files
    (out_dir / "HANDOUT.md").write_text(handout(regions, only))
    return [r for r in regions if r.number in only]


CONVENTIONS = r"""## Conventions (every assignment)

1. **Steps.** Code steps are $t = 0, \dots, T-1$; code step $t$ is the paper's step $t+1$ (the papers
   count $1, \dots, T$). So `betas[t]` is the paper's $\beta_{t+1}$, and a formula written with paper
   steps shifts by one: the cosine schedule's $\bar\alpha_t = f(t)/f(0)$ becomes $f(t+1)/f(0)$ in code
   steps. Code $t = T-1$ is the noisiest step, code $t = 0$ the last denoising step. The maths below is
   written in code steps.
2. **$\bar\alpha_{-1} = 1$.** `alpha_bars_prev[t]` is $\bar\alpha_{t-1}$, and `alpha_bars_prev[0]` is 1:
   "step $-1$" is the data itself. A DDIM step to `t_prev = -1` lands on $\hat x_0$.
3. **Ints or tensors.** `t` and `t_prev` are python ints in the samplers (one step for the whole
   batch) and `(B,)` LongTensors in training (one step per example). The schedule's methods take both:
   `self._gather(values, t, x)` gives `values[t]` shaped to broadcast against `x`, `(1, ..., 1)` for an
   int and `(B, 1, ..., 1)` for a tensor. Your code must work with both.
4. **Notation.** $\alpha_t = 1 - \beta_t$ and $\bar\alpha_t = \prod_{i \le t} \alpha_i$ as in DDPM (DDIM writes
   $\alpha$ for $\bar\alpha$); $s$ is the classifier-free guidance scale ($s = 1$: no guidance) and
   $\gamma$ the classifier-guidance scale ($\gamma = 0$: none; Guided calls it $s$ too, but the two are
   used together here, so each has its own letter, as in the code, the notebooks and the command line
   `--guidance-scale` / `--classifier-scale`); $\eta$ is DDIM's noise level; $\varepsilon(c)$ and $\varepsilon(c_u)$ are the noise
   predictions with the prompt and with the empty prompt.
5. **Only the regions are graded.** Write everything between `# BEGIN ASSIGNMENT N` and
   `# END ASSIGNMENT N`. The grader takes the code between the markers and nothing else: code you
   change or add outside them (a helper function, an edited test) is not used, and it may grade with
   tests that are not in this kit.
"""


def handout(regions, only):
    """The students' handout (Markdown): the conventions, then per assignment what to write, the maths,
    where to read and how to grade."""
    out = ["# tinyldm: assignments", "",
           "Each assignment is a set of marked regions in `tinyldm/` that raise `NotImplementedError`.",
           "Write the code between `# BEGIN ASSIGNMENT N` and `# END ASSIGNMENT N`; the docstrings and",
           "comments around each region say what goes in and what comes out. Grade yourself with",
           "`python -m course grade` (all) or `--only N`; the same tests run with",
           "`python -m pytest --assignment N`. The other tests (training, notebooks) need every assignment.", "",
           CONVENTIONS]
    for a in ASSIGNMENTS:
        if a.number not in only:
            continue
        out += [f"## Assignment {a.number}: {a.title}", "", "Write:", ""]
        out += [f"- `{r.path}`: `{r.function}` (line {r.begin}){f', {r.note}' if r.note else ''}"
                for r in regions if r.number == a.number]
        out += ["", f"The maths: {a.equations}", "", f"Read: {a.papers}.", ""]
        out += ["The notebooks that explain it:" if len(a.notebooks) > 1 else "The notebook that explains it:", ""]
        out += [f"- `{path}`: {what}" for path, what in a.notebooks]
        out += ["", f"Grade it: `python -m course grade --only {a.number}`", ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# grade: the instructor's tests on the submission's regions, each assignment scored


def _skeleton(text, path):
    """text with every region's code removed (markers kept): the code outside the regions."""
    lines = text.splitlines()
    for r in reversed(find_regions(text, path)):
        del lines[r.begin:r.end - 1]
    return lines


def splice(reference, submitted, path="<string>"):
    """The reference file with each region's code taken from the submitted file, and notes (one line each)
    on what of the submission is not used.

    Regions are matched by (assignment, function), in order. A region the submission lacks, or every
    region of a file whose markers are broken, is graded as not written (the starter's raise). The code
    outside the regions is always the reference's: a note says where the submission's differs.
    """
    # 1. the submission's regions; broken markers count as no regions at all
    notes = []
    try:
        theirs = find_regions(submitted, path)
    except MarkerError as e:
        theirs = None
        notes.append(f"{e}; every region of {path} is graded as not written")
    # 2. the code outside the regions: compared, never used
    if theirs is not None:
        matcher = difflib.SequenceMatcher(None, _skeleton(reference, path), _skeleton(submitted, path),
                                          autojunk=False)
        changed = sum(max(i2 - i1, j2 - j1) for op, i1, i2, j1, j2 in matcher.get_opcodes() if op != "equal")
        if changed:
            notes.append(f"{path}: {changed} changed line(s) outside the assignment regions; "
                         "the grade uses the instructor's code there")
    # 3. for each of the reference's regions, the submission's code of the same (assignment, function)
    by_key = {}
    for r in theirs or ():
        by_key.setdefault((r.number, r.function), []).append(r)
    submitted_lines, seen, bodies = submitted.splitlines(keepends=True), {}, []
    ours = find_regions(reference, path)
    for r in ours:
        key = (r.number, r.function)
        k = seen[key] = seen.get(key, -1) + 1  # the k-th region of this key in the file
        if k < len(by_key.get(key, ())):
            bodies.append(submitted_lines[by_key[key][k].begin:by_key[key][k].end - 1])
        else:
            bodies.append([_raise_line(r)])
            if theirs is not None:
                notes.append(f"{path}: no region of assignment {r.number} in {r.function}; graded as not written")
    # 4. the reference with those bodies between its markers
    lines = reference.splitlines(keepends=True)
    for r, body in reversed(list(zip(ours, bodies))):  # from the bottom, so line numbers stay valid
        lines[r.begin:r.end - 1] = body
    return "".join(lines), notes


def assemble(submission, instructor, dest):
    """Write the tree grading runs in: a copy of the instructor's project with the code of the submission's
    regions spliced into its marked files. Returns the notes on what of the submission is not used."""
    submission, instructor = Path(submission).resolve(), Path(instructor).resolve()
    regions = project_regions(instructor)
    inside = () if submission == instructor else (submission,)  # a submission kept in the instructor's tree
    shutil.copytree(instructor, dest, ignore=copy_ignore(instructor, leave_out=inside))
    notes = []
    for path in sorted({r.path for r in regions}):
        if not (submission / path).is_file():
            raise FileNotFoundError(f"{submission} is not a submission of this project: it has no {path}")
        text, file_notes = splice((instructor / path).read_text(), (submission / path).read_text(), path)
        (Path(dest) / path).write_text(text)
        notes += file_notes
    marked = {r.path for r in regions}
    for file in sorted((submission / "tinyldm").glob("*.py")):  # the package's other files are not used
        path = str(file.relative_to(submission))
        if path not in marked and (not (instructor / path).is_file()
                                   or (instructor / path).read_bytes() != file.read_bytes()):
            notes.append(f"{path}: differs from the instructor's (no assignment regions); not used")
    return notes


def graded_test_files(project_dir):
    """The test files of project_dir (tests/ and its subfolders, tests/hidden/ too) that mark assignment tests;
    collecting the others (training, notebooks) is slow."""
    project_dir = Path(project_dir)
    return [str(f.relative_to(project_dir)) for f in sorted((project_dir / "tests").rglob("test_*.py"))
            if "mark.assignment(" in f.read_text()]


def _check_project(folder, role):
    if not (folder / "tests").is_dir() or not (folder / "tinyldm").is_dir():
        what = "no such folder" if not folder.is_dir() else "it has no tests/ or no tinyldm/ folder"
        raise FileNotFoundError(f"{folder} is not {role}: {what}")


def grade(submission=ROOT, only=None, tests=ROOT, pytest_args=(), timeout=1800):
    """Grade the regions of `submission` with the tests of the instructor's project `tests` (default: this
    repository) for the assignments in `only` (default: all), as the module docstring says.

    Returns {"assignments": [{"number", "title", "tests": [{"test", "outcome", "message"}], "total",
    "passed"}], "passed", "total", "collection_errors", "notes" (what of the submission was not used),
    "submission", "tests_from"}.
    """
    submission, tests = Path(submission).resolve(), Path(tests).resolve()
    _check_project(tests, "an instructor's project to grade with")
    if not submission.is_dir():
        raise FileNotFoundError(f"{submission} is not a submission: no such folder")
    only = sorted(set(only or NUMBERS))
    with tempfile.TemporaryDirectory(prefix="tinyldm-grade-") as tmp:
        # 1. the instructor's project, with the submission's regions in it
        tree, report = Path(tmp) / "project", Path(tmp) / "report.xml"
        notes = assemble(submission, tests, tree)
        if submission == tests:
            notes.append("graded with its own tests: a self-check, not a grade (an instructor runs this command "
                         "from their own copy, or names it with --tests)")
        # 2. pytest there: the instructor's files and ini, no plugins from the environment, no cache
        command = [sys.executable, "-m", "pytest", *graded_test_files(tree), "-m", "assignment", "-q",
                   "-p", "no:cacheprovider", "--rootdir", str(tree), f"--junitxml={report}",
                   "-o", "junit_family=xunit1", *[arg for n in only for arg in ("--assignment", str(n))],
                   *pytest_args]
        if (tree / "pytest.ini").is_file():
            command[3:3] = ["-c", str(tree / "pytest.ini")]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_") and k != "PYTHONPATH"}
        env.update(PYTEST_DISABLE_PLUGIN_AUTOLOAD="1", PYTHONDONTWRITEBYTECODE="1")
        done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
        if not report.is_file():
            raise RuntimeError(f"pytest did not run in {tree}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
        cases = list(ET.parse(report).getroot().iter("testcase"))
    # 3. each test case's outcome, under its assignment
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
            cases_of_a = results[a.number]
            table.append({"number": a.number, "title": a.title, "tests": cases_of_a, "total": len(cases_of_a),
                          "passed": sum(t["outcome"] == "passed" for t in cases_of_a)})
    return {"submission": str(submission), "tests_from": str(tests), "notes": notes,
            "assignments": table, "collection_errors": errors,
            "passed": sum(r["passed"] for r in table), "total": sum(r["total"] for r in table)}


def print_table(result):
    print(f"graded: {result['submission']}, with the tests of {result['tests_from']}")
    print(f"{'':>3} {'assignment':<56} {'passed':>9}")
    for r in result["assignments"]:
        mark = "ok" if r["total"] and r["passed"] == r["total"] else ""
        print(f"{r['number']:>3} {r['title']:<56} {r['passed']:>4}/{r['total']:<4} {mark}")
    print(f"{'':>3} {'total':<56} {result['passed']:>4}/{result['total']:<4}")
    for e in result["collection_errors"]:
        print(f"error (these tests were not collected, so the table misses them): {e['test']}: {e['message']}")
    for note in result["notes"]:
        print(f"note: {note}")
