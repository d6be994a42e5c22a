"""Command line: `python -m course make OUT_DIR` writes a starter kit, `python -m course grade SUBMISSION`
grades one with the instructor's tests (this repository's, or --tests INSTRUCTOR_PROJECT).

  python -m course make ../starter                        # every assignment removed; or --only 3 5
  python -m course grade ../alice                         # a score table; --only N, --json for autograders
  python -m course grade ../alice --tests ../instructor   # the tests (tests/hidden/ too) of another copy

Only the code between the assignment markers of SUBMISSION is graded; its tests, conftest.py and
pytest.ini are never run. Grading runs the student's code: sandbox it (course/assignments.py says how).
"""

import argparse
import json
from pathlib import Path

from course.assignments import NUMBERS, ROOT, MarkerError, grade, make, print_table


def make_command(args):
    """Write the starter kit and its handout, or exit with a one-line error."""
    try:
        regions = make(args.out_dir, args.only)
    except (ValueError, FileExistsError) as e:
        raise SystemExit(f"error: {e}")
    print(f"wrote {args.out_dir}: {len(regions)} regions removed "
          f"(assignments {sorted({r.number for r in regions})}); handout: {Path(args.out_dir) / 'HANDOUT.md'}")


def grade_command(args):
    """Grade a submission, print the table (or JSON); exit 0 only when every graded test passes."""
    unknown = sorted(set(args.only or ()) - set(NUMBERS))
    if unknown:
        raise SystemExit(f"error: unknown assignment(s) {unknown}; the assignments are {NUMBERS}")
    try:
        result = grade(args.submission, args.only, tests=args.tests)
    except (FileNotFoundError, MarkerError, RuntimeError) as e:  # RuntimeError: pytest did not start
        raise SystemExit(f"error: {e}")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    raise SystemExit(0 if result["passed"] == result["total"] and not result["collection_errors"] else 1)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m course", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("make", help="write a starter kit (regions replaced by raise) and HANDOUT.md")
    p.add_argument("out_dir", help="a new folder for the students' copy of the project")
    p.add_argument("--only", type=int, nargs="+", metavar="N", help="remove only these assignments (default: all)")
    p.set_defaults(run_command=make_command)

    p = commands.add_parser("grade", help="grade a submission with the instructor's tests; print a score table")
    p.add_argument("submission", nargs="?", default=".",
                   help="the student's copy of the project; only its assignment regions are used (default: .)")
    p.add_argument("--tests", default=str(ROOT), metavar="INSTRUCTOR_PROJECT",
                   help="the project whose tests (tests/hidden/ too), conftest.py and pytest.ini grade it "
                        "(default: this repository)")
    p.add_argument("--only", type=int, nargs="+", metavar="N", help="grade only these assignments")
    p.add_argument("--json", action="store_true", help="print the results as JSON (for autograders)")
    p.set_defaults(run_command=grade_command)

    # `mutants`: wrong answers must fail the tests, equivalent ones pass. The instructor's copy only: make
    # leaves the mutation list out of a starter kit (it holds right answers)
    if (Path(__file__).parent / "mutations.py").is_file():
        from course import mutations

        mutations.add_command(commands)

    args = parser.parse_args(argv)
    args.run_command(args)


if __name__ == "__main__":
    main()
