"""`unipool train`: the training loop, top to bottom.

    unipool train                                   # demo: UniPool on Shakespeare, CPU, a few minutes
    unipool train --preset unipool-182m --data.sources corpus.jsonl --data.tokenizer gpt2 --train.steps 20000
    unipool train --resume runs/demo-20261123-091500  # continue exactly where it stopped
    torchrun --nproc_per_node 8 -m unipool.train --preset unipool-182m --train.distributed fsdp ...

`setup`: run directory -> data -> build the model on meta -> init (or restore) -> wrap (DDP / FSDP2) -> AdamW
-> the run's Checkpointer. `train_step`: `grad_accum` micro-batches (after every micro-batch forward the
model's routing state, the pool loss's f-bar used by the next one, is refreshed outside forward), clipping,
the update; it returns the divergence guard's decision (guard.py). `train` only orchestrates: steps,
logging (routing bookkeeping in telemetry.py), evaluation, checkpoints (checkpoint.py) and the end of the
run (summary.py). What is specific to DDP/FSDP lives in distributed.py.

Choices:
- Weight decay applies to parameters with >= 2 dims (linear, embedding, expert and router matrices),
  not to 1-D ones (RMSNorm weights, the NormRouter scale), as Megatron does.
- Learning rate: linear warmup over warmup_frac of the steps, then cosine to min_lr. It is a pure
  function of the step, so a checkpoint's step is the schedule's whole state.
- Ctrl-C (SIGINT) or SIGTERM finishes the current step, saves a checkpoint and exits (status 130);
  a second Ctrl-C stops at once.
- Divergence guard (train.on_nonfinite): a step whose global gradient norm is NaN/inf never reaches the
  optimizer. The norm is the float clipping already returns (no extra sync), it is the same on every
  rank, and a non-finite loss always makes it non-finite. `skip` drops that update (up to
  max_bad_steps in a row), `stop` ends the run at once, `rollback` reloads the last checkpoint; a run
  that cannot go on ends with one line naming the step and how to continue. Checkpoints are written
  only with finite weights (see checkpoint.py), so a diverging run never replaces the good ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from unipool.analysis.eval import evaluate
from unipool.config import (
    RunConfig,
    add_config_args,
    apply_dict,
    explicit_fields,
    resolve_config,
    resume_incompatibilities,
)
from unipool.data.corpus import DataError
from unipool.data.dataset import TokenDataset, WindowSampler, data_identity, eval_batches
from unipool.data.prepare import prepare_run_data
from unipool.data.tokenizer import Tokenizer
from unipool.errors import UnipoolError
from unipool.model.config import ConfigError
from unipool.model.model import Unipool, build_model
from unipool.run import MetricsWriter, Run, default_device
from unipool.train import distributed as dist
from unipool.train.checkpoint import Checkpointer, NonFiniteStateError
from unipool.train.guard import Decision, DivergenceGuard, StopFlag, nonfinite_report
from unipool.train.summary import end_screen, finish, write_end_report
from unipool.train.telemetry import RoutingTally, check_router_scales
from unipool.weights import CheckpointError, check_weight_shapes, load_state, load_weights

# ---- pieces the loop calls ---------------------------------------------------------------------------

def lr_at(step: int, total_steps: int, lr: float, min_lr: float, warmup_frac: float) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine towards min_lr.

    Kept as every study so far trained with it: the warmup is floor(warmup_frac x total_steps) steps (none
    when that is 0, e.g. under 100 steps at 0.01), its last step is at lr as is the first cosine step, and the
    last step ends a little above min_lr (the cosine's progress there is (T - 1 - W) / (T - W))."""
    warmup = int(warmup_frac * total_steps)
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: nn.Module, weight_decay: float, shared_lr_power: float = 0.0) -> list[dict]:
    """AdamW's groups: decayed (>= 2 dims) and not; with `shared_lr_power` p > 0, the experts of a pool that
    s layers share get a group of their own whose learning rate is scaled by s^-p (`lr_scale`, applied by
    `set_lr`; Expert Tying divides by sqrt(g): p = 0.5). Without it the groups are as they always were, so
    older checkpoints' optimizer states still load."""
    shared = model.config.layers_per_pool if shared_lr_power else 1
    experts = {id(p) for p in model.experts.parameters()} if shared > 1 else set()
    decay = [p for p in model.parameters() if p.ndim >= 2 and id(p) not in experts]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if experts:
        groups.append({"params": [p for p in model.experts.parameters()], "weight_decay": weight_decay,
                       "lr_scale": shared ** -shared_lr_power})
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters())), "every parameter in one group"
    return groups


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's learning rate, times each group's `lr_scale` (shared experts, see param_groups)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def bf16_supported(device: torch.device) -> bool:
    """bf16 autocast pays off only with native bf16 matmuls: on a CPU without AVX512-BF16/AMX (e.g.
    AVX2 only), bf16 GEMMs fall back to a slow path (measured ~70x slower than fp32 on an AVX2 EPYC)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_device(spec: str, info_local_rank: int) -> torch.device:
    """train.device as a device: `auto` is the package's one rule (run.default_device), `cuda` this rank's GPU."""
    if spec == "auto":
        spec = default_device()
    if spec == "cuda":
        spec = f"cuda:{info_local_rank}"
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {spec} requested but CUDA is not available")
    return torch.device(spec)


def autocast_dtype(run: RunConfig, device: torch.device) -> torch.dtype | None:
    """bf16 where asked for (auto: on a GPU) and the device has native bf16 matmuls; else None (fp32).
    On CPU even native bf16 (AVX512-BF16, Zen 4) measured slower than fp32 at the small shapes CPU runs
    use (1.22x slower tokens/s on the CPU study's model), hence fp32 for auto."""
    want = run.train.precision == "bf16" or (run.train.precision == "auto" and device.type == "cuda")
    if want and not bf16_supported(device):
        dist.print0(f"note: {device} has no native bf16 matmul; training in fp32")
        return None
    return torch.bfloat16 if want else None


def check_feasible(run: RunConfig, info: dist.DistInfo, mode: str) -> None:
    """Refuse what cannot run, before any data or model work."""
    tc = run.train
    if tc.batch_size % info.world_size:
        raise ConfigError(f"train.batch_size: {tc.batch_size} is not divisible by {info.world_size} ranks")
    if tc.seq_len > run.model.max_seq_len:
        raise ConfigError(f"train.seq_len: {tc.seq_len} exceeds model.max_seq_len={run.model.max_seq_len}")
    if mode != "none" and not info.enabled:
        dist.print0(f"note: train.distributed {mode} without torchrun: one process, no data parallelism")
    if mode == "fsdp" and tc.on_nonfinite == "rollback":  # refused in one process too: the same config under torchrun
        # Rolling back copies full weights into the model in place, which FSDP2's sharded parameters
        # do not take.
        raise ConfigError("train.on_nonfinite: rollback is not supported with train.distributed=fsdp; use skip or stop")


def check_out_dir(out_dir: Path) -> None:
    """train.out_dir and every folder above it that exists must be a directory (not a file)."""
    for p in (out_dir, *out_dir.parents):
        if p.exists():
            if not p.is_dir():
                raise ConfigError(f"train.out_dir: {p} is a file, not a directory (got {str(out_dir)!r})")
            return


def run_directory(run: RunConfig, resume: Run | None) -> tuple[Path, Path | None]:
    """(RUN, the checkpoint to resume from). On resume, a model or data the checkpoint cannot continue is
    refused, naming the differing fields; a new run refuses a directory that already holds one, unless that
    one stopped before its first checkpoint (nothing to resume: it starts again there)."""
    if resume is None:
        check_out_dir(Path(run.train.out_dir))
        name = run.train.run_name or f"{run.preset}-{datetime.now():%Y%m%d-%H%M%S}"
        run_dir = Path(run.train.out_dir) / dist.broadcast_object(name)
        if Run.holds_run(run_dir):
            if (run_dir / "checkpoints" / "LATEST").is_file():
                raise ConfigError(f"train.run_name: {run_dir} already holds a run; use --resume {run_dir} or "
                                  "another name")
            dist.print0(f"{run_dir} holds a start that stopped before its first checkpoint: starting it again")
        return run_dir, None
    saved_config = resume.config.replace(model=resume.model_config)  # the weights' own config decides
    bad = resume_incompatibilities(saved_config, run)
    if bad:
        raise CheckpointError(f"cannot resume {resume.path}: the config differs in {', '.join(bad)}")
    return resume.path, resume.latest_checkpoint()


def init_source(run: RunConfig, resume: Run | None,
                model_fields: dict | None = None) -> tuple[RunConfig, Run | None]:
    """`train.init_from`: the run config with the source's model config (its weights decide) and on top of
    it the model fields the command line named (`model_fields`: a loss coefficient, say; a field that
    changes a weight's shape is refused when the weights load), and the source (None without one, or when
    resuming: a resumed run has its own weights)."""
    if not run.train.init_from or resume is not None:
        return run, None
    try:
        source = Run.open(run.train.init_from)
        if source.checkpoint is None:
            raise CheckpointError(f"{run.train.init_from} has no checkpoint")
        source.tokenizer_path()
    except UnipoolError as e:
        raise ConfigError(f"train.init_from: {e}") from None
    model = source.model_config
    if model_fields:
        model = apply_dict(run.replace(model=model), {"model": model_fields}, "model flags with train.init_from").model
    return run.replace(model=model), source


def prepare_data(run: RunConfig, resume: Run | None, info: dist.DistInfo, source: Run | None = None):
    """The run config with the tokenizer's vocabulary and the data directory filled in, the tokenizer,
    and the two splits. Rank 0 prepares, the others wait; a resumed run keeps its own tokenizer, a run
    initialised from another (`source`) takes that one's."""
    data_dir = None
    if info.is_main:
        keep = resume or source
        data_dir = prepare_run_data(run.data, keep.tokenizer() if keep else None)
    data_dir = dist.broadcast_object(data_dir)
    train_ds, val_ds = TokenDataset(data_dir, "train"), TokenDataset(data_dir, "val")
    if val_ds.n_tokens < 2:  # found now, not at the first evaluation after the training time is spent
        what = "is empty" if val_ds.n_tokens == 0 else "has a single token: nothing to predict"
        raise DataError(f"the val split of {data_dir} {what} (data.val_fraction = {run.data.val_fraction})")
    tokenizer = train_ds.tokenizer()
    if resume and run.model.vocab_size != tokenizer.vocab_size:
        raise CheckpointError(f"cannot resume {resume.path}: the tokenizer has {tokenizer.vocab_size} "
                              f"tokens, the checkpoint {run.model.vocab_size}")
    run = run.replace(model=run.model.replace(vocab_size=tokenizer.vocab_size),
                      data=dataclasses.replace(run.data, data_dir=str(data_dir)))
    return run, tokenizer, train_ds, val_ds


@dataclass
class Session:
    """What a run holds while it trains (built by `setup`)."""
    run: RunConfig  # as resolved: the tokenizer's vocabulary and the data directory filled in
    out: Run
    info: dist.DistInfo
    mode: str  # none | ddp | fsdp
    device: torch.device
    amp: torch.dtype | None  # the autocast dtype, None for fp32
    tokenizer: Tokenizer
    train_ds: TokenDataset
    val_ds: TokenDataset
    model: Unipool
    wrapped: nn.Module  # the data-parallel wrapper (the model itself without one)
    forward: nn.Module  # `wrapped`, compiled under exec.compile
    optimizer: torch.optim.Optimizer
    sampler: WindowSampler
    checkpointer: Checkpointer
    step: int  # the step to start from (a resumed checkpoint's)
    resumed: bool

    @property
    def micro_batch(self) -> int:
        return self.run.train.batch_size // self.info.world_size

    @property
    def tokens_per_step(self) -> int:
        tc = self.run.train
        return tc.batch_size * tc.seq_len * tc.grad_accum


def setup(run: RunConfig, resume: Run | None, model_fields: dict | None = None) -> Session:
    """Everything before the first step: devices, the run directory, data, the model (built on meta, then
    initialised, or loaded from `resume`), its wrapper, AdamW, the sampler and the run's checkpointer."""
    tc = run.train
    info = dist.init("cuda" if (default_device() if tc.device == "auto" else tc.device).startswith("cuda") else "cpu")
    mode = dist.resolve_mode(tc.distributed, info)
    device = resolve_device(tc.device, info.local_rank)
    check_feasible(run, info, mode)
    run_dir, resume_from = run_directory(run, resume)
    run, source = init_source(run, resume, model_fields)
    run, tokenizer, train_ds, val_ds = prepare_data(run, resume, info, source)
    out = Run(run_dir, run, resume_from)  # rank 0 writes it: config.json, tokenizer.json
    if info.is_main:
        # an existing directory of a new run is one that stopped before its first checkpoint (run_directory)
        out = Run.create(run_dir, run, tokenizer, exist_ok=True)
        if resume is None:
            out.metrics_path.unlink(missing_ok=True)  # the stopped start's lines
    dist.barrier()

    torch.manual_seed(tc.seed)
    weights_from = resume_from if resume_from is not None else (source.checkpoint if source else None)
    if weights_from is not None:
        check_weight_shapes(run.model, weights_from)  # before allocating what meta.json declares
    model = build_model(run.model, device, init=weights_from is None)
    if weights_from is not None:
        load_state(model, load_weights(weights_from, device), weights_from)
    if source is not None:
        named = "".join(f", model.{k} {v}" for k, v in sorted((model_fields or {}).items()))
        dist.print0(f"initialised from {weights_from} (its model and tokenizer{named}; a fresh optimizer at step 0)")
    model.set_execution(dispatch=run.exec.dispatch, fused_pool_wgrad=run.exec.fused_pool_wgrad,
                        activation_checkpointing=run.exec.activation_checkpointing)
    wrapped = dist.wrap(model, mode, device)
    # The fused kernel is ~6x faster than foreach on CPU (measured on 24M parameters) and exact.
    optimizer = torch.optim.AdamW(param_groups(model, tc.weight_decay, tc.shared_expert_lr_power), lr=tc.lr,
                                  betas=(tc.beta1, tc.beta2), eps=tc.eps, fused=device.type in ("cpu", "cuda"))
    sampler = WindowSampler(train_ds, tc.batch_size // info.world_size, tc.seq_len, seed=tc.seed, rank=info.rank,
                            world_size=info.world_size)
    checkpointer = Checkpointer(out.checkpoints_dir, model, optimizer, sampler, mode, info, tc.keep_last,
                                tc.keep_every, data_identity(train_ds, val_ds))
    if info.is_main:
        checkpointer.remove_stale()
    step = 0
    if resume_from is not None:
        step = checkpointer.restore(resume_from)
        dist.print0(f"resumed {resume_from.parent.parent} at step {step}")
        changed = checkpointer.data_changed(resume_from)
        if changed:  # e.g. the data cache was deleted and the sources grew: the run's tokenizer is reused
            dist.print0(f"note: the training data differs from what step {step} was trained on ({changed}): the "
                        "batches from here on and the validation split are new, so validation losses before and "
                        "after this step are not comparable")
    forward = torch.compile(wrapped) if run.exec.compile else wrapped
    return Session(run, out, info, mode, device, autocast_dtype(run, device), tokenizer, train_ds, val_ds, model,
                   wrapped, forward, optimizer, sampler, checkpointer, step, resume_from is not None)


# ---- one step ----------------------------------------------------------------------------------------

@dataclass
class StepResult:
    decision: Decision
    losses: torch.Tensor  # (lm loss, aux loss), averaged over the micro-batches, on the device
    grad_norm: float
    lr: float


def train_step(s: Session, step: int, total_steps: int, guard: DivergenceGuard, tally: RoutingTally) -> StepResult:
    """Optimizer step `step` (0-based): `grad_accum` micro-batches, clipping, and the update unless the
    gradient norm is non-finite; returns the guard's decision. Nothing of the step outlives it."""
    tc = s.run.train
    lr = lr_at(step, total_steps, tc.lr, tc.min_lr, tc.warmup_frac)
    set_lr(s.optimizer, lr)
    s.model.set_router_progress(step / total_steps)  # router windows (a no-op without one)
    loss_sum = torch.zeros(2, device=s.device)  # lm loss, aux loss (summed over micro-batches)
    tally.start_step()
    for micro in range(tc.grad_accum):
        x, y = (t.to(s.device, non_blocking=True) for t in s.sampler.next_batch())
        with dist.no_sync(s.wrapped, s.mode, skip=micro < tc.grad_accum - 1):
            with torch.autocast(s.device.type, dtype=s.amp, enabled=s.amp is not None):
                out = s.forward(x, y)
            ((out.loss + out.aux_loss) / tc.grad_accum).backward()
            # After backward: a compiled graph may keep the routing buffers for its backward.
            s.model.update_routing_state(out)
        loss_sum += torch.stack([out.loss.detach().float(), out.aux_loss.detach().float()])
        tally.add(out, x.numel())
    tally.end_step(s.model)
    grad_norm = dist.clip_grad_norm(s.model, tc.grad_clip)
    healthy = math.isfinite(grad_norm)  # the same float on every rank
    if healthy:
        s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)
    losses = loss_sum / tc.grad_accum
    decision = guard.healthy_step() if healthy else guard.bad_step(step + 1, nonfinite_report(grad_norm, losses))
    return StepResult(decision, losses, grad_norm, lr)


# ---- what the loop does between steps ----------------------------------------------------------------

class Throughput:
    """Tokens per second of training since the last log, evaluation and checkpoint time left out."""

    def __init__(self):
        self.restart()

    def restart(self) -> None:
        self.t0, self.tokens = time.time(), 0

    def leave_out(self, since: float) -> None:
        """Leave the time since `since` (an evaluation, a checkpoint) out of the rate; the tokens stay."""
        self.t0 += time.time() - since

    def rate(self) -> float:
        return self.tokens / max(time.time() - self.t0, 1e-9)


def previous_summary(out: Run) -> dict:
    """The summary a finished run wrote before ({} if none or unreadable: it is written again anyway)."""
    try:
        return out.summary() or {}
    except UnipoolError:
        return {}


def validate(s: Session) -> float:
    """Mean validation loss over every rank's share of the validation split (collective)."""
    tc = s.run.train
    batches = list(eval_batches(s.val_ds, s.micro_batch, tc.seq_len, tc.eval_tokens or None, s.info.rank,
                                s.info.world_size))
    res = evaluate(s.wrapped, batches, device=s.device, autocast_dtype=s.amp, calls=dist.all_reduce_max(len(batches)))
    sums = dist.all_reduce_sum(torch.tensor([res["loss_sum"], res["tokens"]], dtype=torch.float64, device=s.device))
    return float(sums[0] / sums[1])


def log_record(s: Session, step: int, result: StepResult, tally: RoutingTally, speed: Throughput,
               guard: DivergenceGuard, last: bool) -> dict:
    """The training record of a log step (collective: every rank computes it, rank 0 writes it)."""
    tc = s.run.train
    losses = dist.all_reduce_sum(result.losses) / s.info.world_size
    record = {"step": step, "tokens": step * s.tokens_per_step, "loss": float(losses[0]),
              "aux_loss": float(losses[1]), "lr": result.lr, "grad_norm": result.grad_norm,
              "tok_per_s": round(speed.rate(), 1)}
    if guard.skipped:
        record["skipped_steps"] = guard.skipped  # updates dropped by the guard so far
    with_routing = bool(tc.routing_interval) and (step % tc.routing_interval == 0 or last)
    record.update(tally.record(s.model, with_routing))
    return record


def save(s: Session, step: int, guard: DivergenceGuard) -> Decision:
    """A checkpoint of `step`; weights that overflowed although the gradients were finite are not written,
    and the guard decides (rollback or stop)."""
    try:
        s.checkpointer.save(step, step * s.tokens_per_step)
    except NonFiniteStateError as e:
        return guard.bad_step(step, str(e), skippable=False)
    guard.saved()
    return "step"


def roll_back(s: Session, metrics: MetricsWriter, bar: tqdm, tally: RoutingTally, total_steps: int) -> int:
    """The guard's rollback: the latest checkpoint back into the live state; its step."""
    restored = s.checkpointer.rollback(s.device)
    metrics.truncate(restored)
    bar.reset(total_steps)
    bar.update(restored)
    tally.reset()
    return restored


# ---- the loop ----------------------------------------------------------------------------------------

def train(run: RunConfig, resume: Run | str | Path | None = None, model_fields: dict | None = None) -> dict:
    """Train as `run` says (resuming from a run's latest checkpoint if given); returns the summary.
    `model_fields`: the model fields the command line named, applied over a `train.init_from` source's."""
    t_start = time.time()
    s = setup(run, Run.open(resume) if isinstance(resume, (str, Path)) else resume, model_fields)
    run, tc, info = s.run, s.run.train, s.info
    total_steps = tc.total_steps(s.tokens_per_step)
    metrics = s.out.metrics_writer(info.is_main, tc.tensorboard)
    if s.resumed:
        metrics.truncate(s.step)
    counts = s.model.param_counts()
    dist.print0(f"run {s.out.path}: {run.preset_label()} {run.model.moe_mode}, {counts['total'] / 1e6:.1f}M params "
                f"({counts['active'] / 1e6:.1f}M active), {s.train_ds.n_tokens:,} train tokens, {total_steps} steps "
                f"x {s.tokens_per_step:,} tokens, {s.device}" + (f", {s.mode} x{info.world_size}" if info.enabled else ""))
    guard = DivergenceGuard(tc.on_nonfinite, tc.max_bad_steps, s.checkpointer)
    tally = RoutingTally(run.model.n_layers, run.model.n_routed_experts, run.model.layers_per_pool, s.device)
    step, stopped, val_loss, train_time, speed = s.step, False, None, 0.0, Throughput()
    bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True, disable=not (info.is_main and tc.progress))
    try:
        with StopFlag() as stop:
            while step < total_steps:
                t0 = time.time()
                result = train_step(s, step, total_steps, guard, tally)
                train_time += time.time() - t0
                if result.decision == "stop":
                    raise guard.stop_error()
                if result.decision == "rollback":
                    step = roll_back(s, metrics, bar, tally, total_steps)
                    speed.restart()
                    continue
                step, last = step + 1, step + 1 == total_steps
                speed.tokens += s.tokens_per_step
                bar.update(1)
                if step % tc.log_interval == 0 or last:
                    record = log_record(s, step, result, tally, speed, guard, last)
                    metrics.log(record)
                    check_router_scales(record)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{speed.rate():,.0f}", refresh=False)
                    speed.restart()
                if (tc.eval_interval and step % tc.eval_interval == 0) or last:
                    paused = time.time()
                    val_loss = validate(s)
                    metrics.log({"step": step, "tokens": step * s.tokens_per_step, "val_loss": val_loss,
                                 "val_ppl": math.exp(min(val_loss, 50))})
                    speed.leave_out(paused)
                if info.enabled:
                    stop.set = bool(dist.all_reduce_sum(torch.tensor(float(stop.set), device=s.device)) > 0)
                if (tc.ckpt_interval and step % tc.ckpt_interval == 0) or last or stop.set:
                    paused = time.time()
                    decision = save(s, step, guard)
                    if decision == "stop":
                        raise guard.stop_error()
                    if decision == "rollback":
                        step = roll_back(s, metrics, bar, tally, total_steps)
                        speed.restart()
                        continue
                    speed.leave_out(paused)
                if stop.set and not last:
                    stopped = True
                    break
    finally:
        bar.close()
        metrics.close()
    # "signal": a SIGINT/SIGTERM that reached the loop, also one in the last step (the run then completes and
    # is not "interrupted"): a caller that runs several trainings in one process stops on it too
    summary = {"run_dir": str(s.out.path), "step": step, "tokens": step * s.tokens_per_step, "interrupted": stopped,
               "signal": stop.signal_name, "wall_time_s": round(time.time() - t_start, 2),
               "train_time_s": round(train_time, 2)}
    if stopped:
        dist.print0(f"stopped at step {step}; continue with: unipool train --resume {s.out.path}")
        return summary
    tok_per_s = s.tokens_per_step * (step - s.step) / max(train_time, 1e-9)
    if val_loss is None:  # resumed a run that had already finished: no step was timed now
        val_loss = validate(s)
        before = previous_summary(s.out)
        tok_per_s = before.get("tok_per_s", tok_per_s)
        summary["train_time_s"] = before.get("train_time_s", summary["train_time_s"])
    summary.update(finish(run, s.model, s.tokenizer, s.train_ds, s.val_ds, val_loss, s.amp, s.device, tok_per_s))
    report = write_end_report(Path(s.out.path), s.model, s.val_ds, s.micro_batch, tc.seq_len, info.is_main, summary)
    summary["report"] = str(report) if report else None
    if info.is_main:
        s.out.summary_path.write_text(json.dumps(summary, indent=2) + "\n")
        print(end_screen(run, summary))
    return summary


# ---- command line ------------------------------------------------------------------------------------

def add_train_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p)


def cmd_train(args: argparse.Namespace) -> int:
    resume = None
    if args.resume:
        if not Run.holds_run(args.resume):
            raise CheckpointError(f"cannot resume: {Path(args.resume) / 'config.json'} not found")
        resume = Run.open(args.resume)  # config.json is read here, once
    run = resolve_config(args, resume.config if resume else None)
    try:
        summary = train(run, resume=resume,
                        model_fields=explicit_fields(args, "model") if run.train.init_from else None)
    finally:
        dist.teardown()
    return 130 if summary["interrupted"] else 0
