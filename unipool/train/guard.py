"""How a run stops early: a signal (`StopFlag`: Ctrl-C or SIGTERM finishes the step, saves a checkpoint and
exits), or the divergence guard (train.on_nonfinite): what a step with a non-finite gradient norm, or a
checkpoint that would hold non-finite weights, does to the run.

A step's outcome is one of four decisions. `step`: a healthy update. `skip`: the update is dropped (up to
train.max_bad_steps in a row). `rollback`: the latest checkpoint is loaded back and the steps since are
replayed. `stop`: the run ends with one line naming the step and how to continue (`stop_error`). Detection
uses the gradient norm that clipping already returns (no extra sync), the same float on every rank, so
every rank decides the same; a non-finite loss always makes it non-finite.
"""

from __future__ import annotations

import signal
import sys
from typing import Literal

import torch

from unipool.errors import UnipoolError
from unipool.train import distributed as dist

Decision = Literal["step", "skip", "rollback", "stop"]


class DivergenceError(UnipoolError):
    """Training produced NaN/inf and train.on_nonfinite says not to go on."""


def nonfinite_report(grad_norm: float, loss_sum: torch.Tensor) -> str:
    """A bad step in words (reads this rank's loss: only on the bad path)."""
    loss, aux = (float(v) for v in loss_sum)
    return f"gradient norm {grad_norm}, loss {loss:.4g}, aux loss {aux:.4g}"


class DivergenceGuard:
    """Decides each step per train.on_nonfinite. `bad` counts skipped steps in a row (skip) or rollbacks since
    the last checkpoint was written (rollback: a replay that diverges again at the same place must not loop
    forever). The checkpointer tells which checkpoint is the latest, and keeps the last one written before
    the first bad step (`protect_latest`): weights after it may be finite but already ruined."""

    def __init__(self, policy: str, max_bad: int, checkpointer):
        self.policy, self.max_bad, self.checkpointer = policy, max_bad, checkpointer
        self.bad, self.skipped = 0, 0
        self.reason = ""  # why the last decision was `stop`

    def healthy_step(self) -> Decision:
        if self.policy == "skip":
            self.bad = 0
        return "step"

    def saved(self) -> None:
        if self.policy == "rollback":
            self.bad = 0

    def bad_step(self, step: int, what: str, skippable: bool = True) -> Decision:
        """Step `step` (1-based) produced `what`. Non-finite weights (skippable=False) are past skipping:
        they stop a run unless it rolls back."""
        self.bad += 1
        self.checkpointer.protect_latest()
        latest = self.checkpointer.latest()
        if (self.policy == "stop" or self.bad > self.max_bad or (self.policy == "skip" and not skippable)
                or (self.policy == "rollback" and not latest)):
            why = {"stop": "train.on_nonfinite=stop",
                   "skip": f"more than train.max_bad_steps={self.max_bad} in a row" if skippable else "not skippable",
                   "rollback": f"after {self.bad - 1} rollback(s)" if latest else "no checkpoint to roll back to"}
            self.reason = f"training diverged at step {step}: {what} ({why[self.policy]}); "
            return "stop"
        if self.policy == "skip":
            self.skipped += 1
            note = f"update skipped ({self.bad} of at most {self.max_bad} in a row)"
        else:
            note = f"rolling back to {latest} ({self.bad} of at most {self.max_bad})"
        dist.print0(f"warning: step {step}: {what}; {note}", file=sys.stderr)
        return self.policy

    def stop_error(self) -> DivergenceError:
        """The one line a stopped run ends with: what happened, and the command that continues it."""
        latest, run_dir = self.checkpointer.latest(), self.checkpointer.run_dir
        cont = (f"the latest checkpoint is {latest}; continue with a lower learning rate: unipool train --resume "
                f"{run_dir} --train.lr LR" if latest else
                "no checkpoint was written; start again with a lower --train.lr")
        return DivergenceError(self.reason + cont)


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop checks it between steps. A second SIGINT interrupts at once."""

    def __init__(self):
        self.set = False
        self.signal_name: str | None = None  # the signal that set the flag (also when it lands in the last step)
        self._old = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.set and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.set, self.signal_name = True, signal.Signals(signum).name
        dist.print0("\nstopping after this step (Ctrl-C again to abort without a checkpoint)")

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
