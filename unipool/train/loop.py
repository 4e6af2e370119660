"""`unipool train`: the training loop, top to bottom.

    unipool train                                   # demo: UniPool on Shakespeare, CPU, a few minutes
    unipool train --preset unipool-182m --data.sources corpus.jsonl --data.tokenizer gpt2 --train.steps 20000
    unipool train --resume runs/demo-20261123-091500  # continue exactly where it stopped
    torchrun --nproc_per_node 8 -m unipool.train --preset unipool-182m --train.distributed fsdp ...

The loop: run directory -> data -> build the model on meta -> init (or restore) -> wrap (DDP / FSDP2)
-> AdamW -> steps. Each step runs `grad_accum` micro-batches; after every micro-batch forward the
model's routing state (the pool loss's f-bar from this micro-batch, used by the next one) is refreshed
outside forward. Evaluation, routing statistics, metrics and checkpoints are plain function calls
inside the loop; what is specific to FSDP lives in distributed.py, checkpoint layout in checkpoint.py.

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
import resource
import signal
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from unipool.analysis import run_report
from unipool.analysis.eval import evaluate
from unipool.analysis.generate import generate
from unipool.analysis.routing import load_stats
from unipool.config import RunConfig, add_config_args, resolve_config, resume_incompatibilities
from unipool.data.corpus import DataError
from unipool.data.dataset import TokenDataset, WindowSampler, eval_batches, prepare_run_data, unigram_loss
from unipool.errors import DiskFullError, UnipoolError, is_disk_full
from unipool.model.config import ConfigError
from unipool.model.model import ModelOutput, build_model
from unipool.run import Run
from unipool.train import checkpoint as ckpt
from unipool.train import distributed as dist

# ---- pieces the loop calls ---------------------------------------------------------------------------

def lr_at(step: int, total_steps: int, lr: float, min_lr: float, warmup_frac: float) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine to min_lr."""
    warmup = int(warmup_frac * total_steps)
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    assert len(decay) + len(no_decay) == len(list(model.parameters())), "every parameter in exactly one group"
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Metrics:
    """RUN/metrics.jsonl on rank 0, mirrored to TensorBoard when asked for and installed."""

    def __init__(self, run: Run, enabled: bool, tensorboard: bool, resume_step: int | None):
        self.enabled, self.path, self.tb = enabled, run.metrics_path, None
        if not enabled:
            return
        if resume_step is not None:
            self.truncate(resume_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run.path / "tensorboard"))
            except ImportError:
                print("tensorboard is not installed (pip install 'unipool[tensorboard]'); logging to "
                      "metrics.jsonl only", file=sys.stderr)

    def truncate(self, step: int) -> None:
        """Drop the records after `step` (a resumed or rolled-back run redoes them), and any line a
        crash or a full disk cut short, with a warning."""
        if not self.enabled or not self.path.is_file():
            return
        kept, bad = [], 0
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                record, bad = None, bad + 1
            if isinstance(record, dict) and isinstance(record.get("step", 0), int) and record.get("step", 0) <= step:
                kept.append(line)
        if bad:
            print(f"warning: {self.path}: dropped {bad} unreadable line(s) (cut short by a crash or a full disk?)",
                  file=sys.stderr)
        self.path.write_text("".join(ln + "\n" for ln in kept))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            if is_disk_full(e):
                raise DiskFullError(f"No space left on device while writing {self.path}") from None
            raise
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "tokens"):
                    self.tb.add_scalar(k, v, record["step"])
            if "routing" in record:
                self.tb.add_scalar("dead_experts", record["routing"]["dead_experts"], record["step"])
                self.tb.add_scalar("balance_cv", record["routing"]["balance_cv"], record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class RouterScaleError(UnipoolError, RuntimeError):
    """A NormRouter's sigma crossed zero: its gates and the balance loss have turned negative."""


def end_of_step_routing(model, step_counts_LE: torch.Tensor) -> None:
    """Once per optimizer step: sigmoid routers' aux-loss-free biases move from the step's counts,
    summed over its micro-batches and all-reduced over ranks (the official code's cadence)."""
    if model.has_router_biases:
        model.update_router_biases(dist.all_reduce_sum(step_counts_LE.clone()))


def router_telemetry(model, dead_L: torch.Tensor, tokens: int) -> dict:
    """Per layer since the last log: the share of tokens whose picked gates were all exactly zero
    (`dead_rows`; accumulated on the device per micro-batch, read here once) and NormRouter sigma
    (`router_scale`, absent without NormRouters). Collective under DDP/FSDP: every rank calls it."""
    sums = dist.all_reduce_sum(torch.cat([dead_L, dead_L.new_tensor([float(tokens)])]))
    record = {"dead_rows": [round(v, 5) for v in (sums[:-1] / sums[-1].clamp_min(1)).tolist()]}
    scales = model.router_scales()
    if scales is not None:  # FSDP2 shards them: gather each (a collective)
        record["router_scale"] = [round(float(s.full_tensor() if hasattr(s, "full_tensor") else s), 6)
                                  for s in scales]
    return record


def check_router_scales(record: dict) -> None:
    """Refuse to go on once a NormRouter's sigma is <= 0 (possible with the paper's linear sigma)."""
    bad = [f"layer {i} (sigma {s:.4g})" for i, s in enumerate(record.get("router_scale", [])) if not s > 0]
    if bad:
        raise RouterScaleError(f"step {record['step']}: NormRouter sigma crossed zero in {', '.join(bad)}; "
                               "stopping (model.norm_router_scale=softplus or exp keeps it positive)")


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop checks it between steps. A second SIGINT interrupts at once."""

    def __init__(self):
        self.set = False
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
        self.set = True
        dist.print0("\nstopping after this step (Ctrl-C again to abort without a checkpoint)")

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class DivergenceError(UnipoolError):
    """Training produced NaN/inf and train.on_nonfinite says not to go on."""


class DivergenceGuard:
    """What a step with a non-finite gradient norm does, per train.on_nonfinite (see the module
    docstring). `bad` counts skipped steps in a row (skip) or rollbacks since the last checkpoint was
    written (rollback: a replay that diverges again at the same place must not loop forever).
    `protect` names the last checkpoint written before the first bad step: weights that came after
    it may be finite but already ruined, so retention keeps it for the rest of the run."""

    def __init__(self, policy: str, max_bad: int, run_dir: Path, on_stop):
        self.policy, self.max_bad, self.run_dir, self.on_stop = policy, max_bad, run_dir, on_stop
        self.bad, self.skipped, self.protect = 0, 0, ()

    def healthy_step(self) -> None:
        if self.policy == "skip":
            self.bad = 0

    def saved(self) -> None:
        if self.policy == "rollback":
            self.bad = 0

    def bad_step(self, step: int, what: str, skippable: bool = True) -> str:
        """Step `step` (1-based) produced `what`; returns "skip" or "rollback", or raises DivergenceError.
        Non-finite weights (skippable=False) are past skipping: they stop a run unless it rolls back."""
        self.bad += 1
        if not self.protect and self._latest():
            self.protect = (self._latest(),)
        if (self.policy == "stop" or self.bad > self.max_bad or (self.policy == "skip" and not skippable)
                or (self.policy == "rollback" and not self._latest())):
            self._stop(step, what, skippable)
        if self.policy == "skip":
            self.skipped += 1
            note = f"update skipped ({self.bad} of at most {self.max_bad} in a row)"
        else:
            note = f"rolling back to {self._latest()} ({self.bad} of at most {self.max_bad})"
        dist.print0(f"warning: step {step}: {what}; {note}", file=sys.stderr)
        return self.policy

    def _latest(self) -> str | None:
        latest = self.run_dir / "checkpoints" / "LATEST"
        return latest.read_text().strip() if latest.is_file() else None

    def _stop(self, step: int, what: str, skippable: bool) -> None:
        self.on_stop()
        why = {"stop": "train.on_nonfinite=stop",
               "skip": f"more than train.max_bad_steps={self.max_bad} in a row" if skippable else "not skippable",
               "rollback": f"after {self.bad - 1} rollback(s)" if self._latest() else "no checkpoint to roll back to"}
        latest = self._latest()
        cont = (f"the latest checkpoint is {latest}; continue with a lower learning rate: unipool train --resume "
                f"{self.run_dir} --train.lr LR" if latest else
                "no checkpoint was written; start again with a lower --train.lr")
        raise DivergenceError(f"training diverged at step {step}: {what} ({why[self.policy]}); {cont}")


def nonfinite_report(grad_norm: float, loss_sum: torch.Tensor) -> str:
    """A bad step in words (reads this rank's loss: only on the bad path)."""
    loss, aux = (float(v) for v in loss_sum)
    return f"gradient norm {grad_norm}, loss {loss:.4g}, aux loss {aux:.4g}"


def roll_back(run_dir: Path, model: nn.Module, optimizer, sampler, mode: str, info: dist.DistInfo,
              device: torch.device) -> int:
    """Load the run's latest checkpoint into the live model, optimizer, sampler, routing buffers and
    RNG (in place, so wrappers and compiled graphs stay valid); returns its step."""
    ckpt_dir = ckpt.latest_target(run_dir / "checkpoints" / "LATEST")
    ckpt.load_state(model, ckpt.load_weights(ckpt_dir, device), ckpt_dir)
    return ckpt.restore_checkpoint(ckpt_dir, model, optimizer, sampler, mode, info)


def bf16_supported(device: torch.device) -> bool:
    """bf16 autocast pays off only with native bf16 matmuls: on a CPU without AVX512-BF16/AMX (e.g.
    AVX2 only), bf16 GEMMs fall back to a slow path (measured ~70x slower than fp32 on an AVX2 EPYC)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_device(spec: str, info_local_rank: int) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
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
    if mode == "fsdp" and tc.on_nonfinite == "rollback":
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
    refused, naming the differing fields; a new run refuses a directory that already holds one."""
    if resume is None:
        check_out_dir(Path(run.train.out_dir))
        name = run.train.run_name or f"{run.preset}-{datetime.now():%Y%m%d-%H%M%S}"
        run_dir = Path(run.train.out_dir) / dist.broadcast_object(name)
        if Run.holds_run(run_dir):
            raise ConfigError(f"train.run_name: {run_dir} already holds a run; use --resume {run_dir} or another name")
        return run_dir, None
    saved_config = resume.config.replace(model=resume.model_config)  # the weights' own config decides
    bad = resume_incompatibilities(saved_config, run)
    if bad:
        raise ckpt.CheckpointError(f"cannot resume {resume.path}: the config differs in {', '.join(bad)}")
    return resume.path, resume.latest_checkpoint()


def prepare_data(run: RunConfig, resume: Run | None, info: dist.DistInfo):
    """The run config with the tokenizer's vocabulary and the data directory filled in, the tokenizer,
    and the two splits. Rank 0 prepares, the others wait; a resumed run keeps its own tokenizer."""
    data_dir = None
    if info.is_main:
        data_dir = prepare_run_data(run.data, resume.tokenizer() if resume else None)
    data_dir = dist.broadcast_object(data_dir)
    train_ds, val_ds = TokenDataset(data_dir, "train"), TokenDataset(data_dir, "val")
    if val_ds.n_tokens < 2:  # found now, not at the first evaluation after the training time is spent
        raise DataError(f"the val split of {data_dir} is empty (data.val_fraction = {run.data.val_fraction})")
    tokenizer = train_ds.tokenizer()
    if resume and run.model.vocab_size != tokenizer.vocab_size:
        raise ckpt.CheckpointError(f"cannot resume {resume.path}: the tokenizer has {tokenizer.vocab_size} "
                                   f"tokens, the checkpoint {run.model.vocab_size}")
    run = run.replace(model=run.model.replace(vocab_size=tokenizer.vocab_size),
                      data=dataclasses.replace(run.data, data_dir=str(data_dir)))
    return run, tokenizer, train_ds, val_ds


def build(run: RunConfig, device: torch.device, mode: str, info: dist.DistInfo, resume_from: Path | None,
          train_ds: TokenDataset):
    """Model (built on meta, then initialised or loaded), its data-parallel wrapper, AdamW and the
    sampler; restored from `resume_from` when given. Returns them and the step to start from."""
    tc = run.train
    torch.manual_seed(tc.seed)
    if resume_from is not None:
        ckpt.check_weight_shapes(run.model, resume_from)  # before allocating what meta.json declares
    model = build_model(run.model, device, init=resume_from is None)
    if resume_from is not None:
        ckpt.load_state(model, ckpt.load_weights(resume_from, device), resume_from)
    model.set_execution(dispatch=run.exec.dispatch, fused_pool_wgrad=run.exec.fused_pool_wgrad,
                        activation_checkpointing=run.exec.activation_checkpointing)
    wrapped = dist.wrap(model, mode, device)
    # The fused kernel is ~6x faster than foreach on CPU (measured on 24M parameters) and exact.
    optimizer = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr, betas=(tc.beta1, tc.beta2),
                                  eps=tc.eps, fused=device.type in ("cpu", "cuda"))
    sampler = WindowSampler(train_ds, tc.batch_size // info.world_size, tc.seq_len, seed=tc.seed, rank=info.rank,
                            world_size=info.world_size)
    step = 0
    if resume_from is not None:
        step = ckpt.restore_checkpoint(resume_from, model, optimizer, sampler, mode, info)
        dist.print0(f"resumed {resume_from.parent.parent} at step {step}")
    return model, wrapped, optimizer, sampler, step


# ---- the loop ----------------------------------------------------------------------------------------

def train(run: RunConfig, resume: Run | str | Path | None = None) -> dict:
    """Train as `run` says (resuming from a run's latest checkpoint if given); returns the summary."""
    t_start = time.time()
    resume = Run.open(resume) if isinstance(resume, (str, Path)) else resume
    tc = run.train
    info = dist.init("cuda" if tc.device.startswith("cuda") or (tc.device == "auto" and torch.cuda.is_available())
                     else "cpu")
    mode = dist.resolve_mode(tc.distributed, info)
    device = resolve_device(tc.device, info.local_rank)
    check_feasible(run, info, mode)
    run_dir, resume_from = run_directory(run, resume)
    run, tokenizer, train_ds, val_ds = prepare_data(run, resume, info)
    out = Run(run_dir, run, resume_from)  # rank 0 writes it: config.json, tokenizer.json
    if info.is_main:
        out = Run.create(run_dir, run, tokenizer, exist_ok=resume is not None)
        ckpt.remove_stale_tmp(out.checkpoints_dir)
    dist.barrier()

    model, wrapped, optimizer, sampler, step = build(run, device, mode, info, resume_from, train_ds)
    step_fn = torch.compile(wrapped) if run.exec.compile else wrapped
    micro_bsz = tc.batch_size // info.world_size
    tokens_per_step = tc.batch_size * tc.seq_len * tc.grad_accum
    total_steps = tc.total_steps(tokens_per_step)
    amp = autocast_dtype(run, device)
    metrics = Metrics(out, info.is_main, tc.tensorboard, step if resume_from is not None else None)
    counts = model.param_counts()
    dist.print0(f"run {run_dir}: {run.preset_label()} {run.model.moe_mode}, {counts['total'] / 1e6:.1f}M params "
                f"({counts['active'] / 1e6:.1f}M active), {train_ds.n_tokens:,} train tokens, {total_steps} steps "
                f"x {tokens_per_step:,} tokens, {device}" + (f", {mode} x{info.world_size}" if info.enabled else ""))

    def validate() -> float:
        batches = list(eval_batches(val_ds, micro_bsz, tc.seq_len, tc.eval_tokens or None, info.rank, info.world_size))
        res = evaluate(wrapped, batches, device=device, autocast_dtype=amp, calls=dist.all_reduce_max(len(batches)))
        sums = dist.all_reduce_sum(torch.tensor([res["loss_sum"], res["tokens"]], dtype=torch.float64, device=device))
        return float(sums[0] / sums[1])

    # -- the loop --
    start_step, stopped, val_loss = step, False, None
    bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True, disable=not (info.is_main and tc.progress))
    counts_LE = torch.zeros(run.model.n_layers, run.model.n_routed_experts, device=device)
    step_counts_LE, dead_L, log_tokens = torch.zeros_like(counts_LE), torch.zeros(run.model.n_layers, device=device), 0
    train_time, interval_t0, interval_tokens = 0.0, time.time(), 0
    guard = DivergenceGuard(tc.on_nonfinite, tc.max_bad_steps, run_dir, on_stop=lambda: (bar.close(), metrics.close()))

    def rollback() -> int:
        """The guard's rollback: the latest checkpoint back into the live state; its step."""
        nonlocal log_tokens
        restored = roll_back(run_dir, model, optimizer, sampler, mode, info, device)
        metrics.truncate(restored)
        bar.reset(total_steps)
        bar.update(restored)
        counts_LE.zero_()
        dead_L.zero_()
        log_tokens = 0
        return restored
    with StopFlag() as stop:
        while step < total_steps:
            t0 = time.time()
            lr = lr_at(step, total_steps, tc.lr, tc.min_lr, tc.warmup_frac)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros(2, device=device)  # lm loss, aux loss (summed over micro-batches)
            step_counts_LE.zero_()
            for micro in range(tc.grad_accum):
                x, y = (t.to(device, non_blocking=True) for t in sampler.next_batch())
                with dist.no_sync(wrapped, mode, skip=micro < tc.grad_accum - 1):
                    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                        out_: ModelOutput = step_fn(x, y)
                    ((out_.loss + out_.aux_loss) / tc.grad_accum).backward()
                    # After backward: a compiled graph may keep the routing buffers for its backward.
                    model.update_routing_state(out_)
                loss_sum += torch.stack([out_.loss.detach().float(), out_.aux_loss.detach().float()])
                step_counts_LE += torch.stack([r.counts_E for r in out_.routing])
                dead_L += torch.stack([r.dead_rows for r in out_.routing])
                log_tokens += x.numel()
                del out_  # its logits and routing must not live on into the next forward
            counts_LE += step_counts_LE
            end_of_step_routing(model, step_counts_LE)
            grad_norm = dist.clip_grad_norm(model, tc.grad_clip)
            healthy = math.isfinite(grad_norm)  # the same float on every rank
            if healthy:
                optimizer.step()
                guard.healthy_step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            train_time += time.time() - t0
            if not healthy and guard.bad_step(step, nonfinite_report(grad_norm, loss_sum / tc.grad_accum)) == "rollback":
                step = rollback()
                continue
            interval_tokens += tokens_per_step
            bar.update(1)

            last = step == total_steps
            if step % tc.log_interval == 0 or last:
                losses = dist.all_reduce_sum(loss_sum / tc.grad_accum) / info.world_size
                tok_per_s = interval_tokens / max(time.time() - interval_t0, 1e-9)
                record = {"step": step, "tokens": step * tokens_per_step, "loss": float(losses[0]),
                          "aux_loss": float(losses[1]), "lr": lr, "grad_norm": grad_norm, "tok_per_s": round(tok_per_s, 1)}
                if guard.skipped:
                    record["skipped_steps"] = guard.skipped  # updates dropped by the guard so far
                if tc.routing_interval and (step % tc.routing_interval == 0 or last):
                    record["routing"] = load_stats(dist.all_reduce_sum(counts_LE.clone()), run.model.layers_per_pool)
                    counts_LE.zero_()
                record.update(router_telemetry(model, dead_L, log_tokens))
                dead_L.zero_()
                log_tokens = 0
                metrics.log(record)
                check_router_scales(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{tok_per_s:,.0f}", refresh=False)
                interval_t0, interval_tokens = time.time(), 0
            if (tc.eval_interval and step % tc.eval_interval == 0) or last:
                val_loss = validate()
                metrics.log({"step": step, "tokens": step * tokens_per_step, "val_loss": val_loss,
                             "val_ppl": math.exp(min(val_loss, 50))})
                interval_t0 = time.time()
            if info.enabled:
                stop.set = bool(dist.all_reduce_sum(torch.tensor(float(stop.set), device=device)) > 0)
            if (tc.ckpt_interval and step % tc.ckpt_interval == 0) or last or stop.set:
                try:
                    ckpt.save_checkpoint(out.checkpoints_dir, step, step * tokens_per_step, model, optimizer, sampler,
                                         mode, info, tc.keep_last, tc.keep_every, guard.protect)
                    guard.saved()
                except ckpt.NonFiniteStateError as e:  # weights overflowed although the gradients were finite
                    guard.bad_step(step, str(e), skippable=False)  # returns only to roll back
                    step = rollback()
                    continue
                interval_t0 = time.time()
            if stop.set and not last:
                stopped = True
                break
    bar.close()
    metrics.close()
    summary = {"run_dir": str(run_dir), "step": step, "tokens": step * tokens_per_step, "interrupted": stopped,
               "wall_time_s": round(time.time() - t_start, 2), "train_time_s": round(train_time, 2)}
    if stopped:
        dist.print0(f"stopped at step {step}; continue with: unipool train --resume {run_dir}")
        return summary
    if val_loss is None:  # resumed a run that had already finished
        val_loss = validate()
    summary.update(finish(run, model, tokenizer, train_ds, val_ds, val_loss, amp, device,
                          tokens_per_step * (step - start_step) / max(train_time, 1e-9)))
    report = write_end_report(Path(run_dir), model, val_ds, micro_bsz, tc.seq_len, info.is_main, summary)
    summary["report"] = str(report) if report else None
    if info.is_main:
        out.summary_path.write_text(json.dumps(summary, indent=2) + "\n")
        print(end_screen(run, summary))
    return summary


def finish(run: RunConfig, model, tokenizer, train_ds, val_ds, val_loss: float, amp, device, tok_s: float) -> dict:
    """The end-of-run figures: validation loss against the unigram baseline, speed, memory, a sample."""
    tc = run.train
    unigram = unigram_loss(train_ds, val_ds)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    counts = model.param_counts()
    text = generate(model, tokenizer, tc.sample_prompt, tc.sample_tokens, temperature=0.8, top_k=50,
                    seed=tc.seed) if tc.sample_tokens else ""
    return {
        "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50)), "unigram_loss": unigram,
        "unigram_ppl": math.exp(unigram), "tok_per_s": round(tok_s, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else None,
        "cpu_time_s": round(usage.ru_utime + usage.ru_stime, 1), "precision": "bf16" if amp else "fp32",
        "params": counts["total"], "active_params": counts["active"], "sample": tc.sample_prompt + text,
    }


def write_end_report(run_dir: Path, model, val_ds, batch_size: int, seq_len: int, is_main: bool,
                     summary: dict) -> Path | None:
    """RUN/report.png from the finished model (every rank measures: FSDP2 forwards are collective; rank 0
    draws). A failure to draw is a warning, never a lost run."""
    measured = run_report.measure(model, eval_batches(val_ds, batch_size, seq_len))
    if not is_main:
        return None
    try:
        return run_report.plot_report(run_report.report_data(Run.open(run_dir), model, measured, summary),
                                      run_dir / "report.png")
    except Exception as e:  # noqa: BLE001 - the run is saved; the picture is a convenience
        print(f"warning: could not write the run report ({type(e).__name__}: {e}); "
              f"try: unipool report {run_dir}", file=sys.stderr)
        return None


def _shown(path: Path | str) -> str:
    """`path` relative to the working directory when it is below it (what a user would type)."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def end_screen(run: RunConfig, summary: dict) -> str:
    """What a finished run prints: how good the model is, a sample, where the picture is, what next."""
    minutes, seconds = divmod(round(summary["wall_time_s"]), 60)
    took = f"{minutes} min {seconds} s" if minutes else f"{seconds} s"
    run_dir = _shown(summary["run_dir"])
    gap = summary["unigram_loss"] - summary["val_loss"]
    lines = [
        "",
        f"finished {run.preset_label()} in {took}: {summary['step']} steps, {summary['tokens']:,} tokens, "
        f"{summary['tok_per_s']:,.0f} tokens/s, peak memory {summary['peak_rss_mb']:,.0f} MB",
        "",
        f"  validation loss   {summary['val_loss']:.3f}   (perplexity {summary['val_ppl']:,.1f})",
        f"  unigram baseline  {summary['unigram_loss']:.3f}   (perplexity {summary['unigram_ppl']:,.1f}: "
        "token frequencies alone, no context)",
        f"  the model is {gap:.2f} nats/token better than the baseline" if gap > 0 else
        "  the model is not better than the baseline yet: train longer or lower the learning rate",
    ]
    if summary.get("sample"):
        lines += ["", "  sample (temperature 0.8, top-k 50):", ""]
        lines += ["    " + ln for ln in summary["sample"].strip("\n").splitlines()]
    lines += ["", f"  run directory: {run_dir}"]
    if summary.get("report"):
        lines += [f"  report:        {_shown(summary['report'])}  (loss curves, expert usage, dead rows, router scale)"]
    lines += ["", "next:"]
    nxt = [(f"unipool routing {run_dir}", "how every layer uses the experts (plots, routing.json)"),
           (f"unipool generate {run_dir} --prompt 'JULIET:'", "more text from the model")]
    runs_dir = Path(_shown(run.train.out_dir))
    if run.preset == "demo":
        nxt += [("unipool train --preset demo-vanilla", "the per-layer MoE baseline, same data and budget"),
                (f"unipool compare {run_dir} {runs_dir / 'demo-vanilla-*'}", "both side by side (after that run)")]
    elif run.preset == "demo-vanilla":
        nxt += [("unipool train", "the UniPool demo, same data and budget"),
                (f"unipool compare {run_dir} {runs_dir / 'demo-2*'}", "both side by side (after that run)")]
    width = max(len(cmd) for cmd, _ in nxt) + 3
    lines += [f"  {cmd:<{width}}{why}" for cmd, why in nxt]
    return "\n".join(lines)


# ---- command line ------------------------------------------------------------------------------------

def add_train_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p)


def cmd_train(args: argparse.Namespace) -> int:
    resume = None
    if args.resume:
        if not Run.holds_run(args.resume):
            raise ckpt.CheckpointError(f"cannot resume: {Path(args.resume) / 'config.json'} not found")
        resume = Run.open(args.resume)  # config.json is read here, once
    run = resolve_config(args, resume.config if resume else None)
    try:
        summary = train(run, resume=resume)
    finally:
        dist.teardown()
    return 130 if summary["interrupted"] else 0
