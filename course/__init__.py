"""Course tooling that needs the whole repository, so it lives beside the package, not in it.

  assignments.py  the assignments: marked regions of tinyldm/, the starter kit and handout, grading
  __main__.py     `python -m course make OUT_DIR` and `python -m course grade [DIR]`
"""
