"""Training: the loop, training checkpoints and the data-parallel wrapping. Nothing in unipool imports this
package but the command line (tests/test_imports.py).

`python -m unipool.train` (and `torchrun -m unipool.train`) is `unipool train`.
"""
