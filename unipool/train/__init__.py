"""Training: the run config, the loop, checkpoints and the data-parallel wrapping.

`python -m unipool.train` (and `torchrun -m unipool.train`) is `unipool train`.
"""
