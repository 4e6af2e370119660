"""`python -m unipool.train ...` (and `torchrun -m unipool.train ...`) is `unipool train ...`: an entry point,
the one module of unipool/train that imports upward (tests/test_imports.py exempts it)."""

import sys

from unipool.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
