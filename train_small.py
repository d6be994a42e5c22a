"""Train tinyldm end to end. Not ready yet: the training stages land with the training issue."""

import sys

print("train_small.py is not ready yet: the training stages are still being built.", file=sys.stderr)
sys.exit(1)
