"""`unipool train`: the training loop, top to bottom.

    unipool train                                   # demo: UniPool on Shakespeare, CPU, a few minutes
    unipool train --preset unipool-182m --data.sources corpus.jsonl --data.tokenizer gpt2 --train.steps 20000
    unipool train --resume runs/demo-20261123-091500  # continue exactly where it stopped
    torchrun --nproc_per_node 8 -m unipool.train --preset unipool-182m --train.distributed fsdp ...

The loop: data -> build the model on meta -> init (or load) -> wrap (DDP / FSDP2) -> AdamW -> steps.
Each step runs `grad_accum` micro-batches; after every micro-batch forward the model's routing state
(the pool loss's f-bar from this micro-batch, used by the next one) is refreshed outside forward.
Evaluation, routing statistics, metrics and checkpoints are plain function calls inside the loop.

Choices:
- Weight decay applies to parameters with >= 2 dims (linear, embedding, expert and router matrices),
  not to 1-D ones (RMSNorm weights, the NormRouter scale), as Megatron does.
- Learning rate: linear warmup over warmup_frac of the steps, then cosine to min_lr. It is a pure
  function of the step, so a checkpoint's step is the schedule's whole state.
- Ctrl-C (SIGINT) or SIGTERM finishes the current step, saves a checkpoint and exits (status 130);
  a second Ctrl-C stops at once.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import signal
import sys
import time
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path

import torch
from torch import nn

from unipool.model.config import ConfigError, ModelConfig, get_preset
from unipool.model.model import ModelOutput, Unipool, build_model
from unipool.train import checkpoint as ckpt
from unipool.train import distributed as dist
from unipool.train.config import (
    RunConfig,
    add_config_args,
    apply_dict,
    default_config,
    load_config_file,
    resolve_config,
    resume_incompatibilities,
)

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


def routing_stats(counts_LE: torch.Tensor, model: Unipool) -> dict:
    """Load per layer and expert, dead experts (no tokens from any layer calling their pool over the
    interval), and balance as the coefficient of variation of each pool's load (0 = perfectly even)."""
    cfg = model.config
    counts_LE = counts_LE.double().cpu()
    load_LE = counts_LE / counts_LE.sum(-1, keepdim=True).clamp_min(1)
    counts_PE = counts_LE.view(cfg.n_pools, cfg.layers_per_pool, -1).sum(1)
    cv_P = counts_PE.std(-1, unbiased=False) / counts_PE.mean(-1).clamp_min(1e-12)
    cv_L = counts_LE.std(-1, unbiased=False) / counts_LE.mean(-1).clamp_min(1e-12)
    return {
        "load_LE": [[round(v, 5) for v in row] for row in load_LE.tolist()],
        "dead_experts": int((counts_PE == 0).sum()),
        "balance_cv": round(float(cv_P.mean()), 5),
        "balance_cv_layer": [round(v, 5) for v in cv_L.tolist()],
    }


@torch.no_grad()
def evaluate(model: nn.Module, val_ds, batch_size: int, seq_len: int, max_tokens: int | None,
             autocast, info: dist.DistInfo, device: torch.device) -> float:
    """Mean cross-entropy over the validation tokens, split across ranks. Every rank runs the same
    number of forwards (padding with weight-0 repeats), which FSDP's collectives need."""
    from unipool.data.dataset import eval_batches

    batches = list(eval_batches(val_ds, batch_size, seq_len, max_tokens, info.rank, info.world_size))
    n_calls = dist.all_reduce_max(len(batches))
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, target count
    for i in range(n_calls):
        real = i < len(batches)
        x, y = batches[i] if real else (torch.zeros(1, 1, dtype=torch.long),) * 2  # joins the collectives
        with autocast:
            out = model(x.to(device), y.to(device))
        if real:
            totals += torch.stack([out.loss.double() * y.numel(), torch.tensor(y.numel(), device=device)])
    model.train()
    dist.all_reduce_sum(totals)
    return float(totals[0] / totals[1])


def sample(model: Unipool, tokenizer, prompt: str, max_new_tokens: int, seed: int) -> str:
    from unipool.analysis.generate import generate

    return generate(model, tokenizer, prompt, max_new_tokens, temperature=0.8, top_k=50, seed=seed)


class Metrics:
    """metrics.jsonl on rank 0, mirrored to TensorBoard when asked for and installed."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, resume_step: int | None):
        self.enabled, self.path, self.tb = enabled, run_dir / "metrics.jsonl", None
        if not enabled:
            return
        if resume_step is not None and self.path.is_file():  # drop lines the resumed run will redo
            lines = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
            kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                print("tensorboard is not installed (pip install 'unipool[tensorboard]'); logging to "
                      "metrics.jsonl only", file=sys.stderr)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
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


def save_checkpoint(run_dir: Path, step: int, tokens: int, model: Unipool, optimizer, sampler,
                    run: RunConfig, mode: str, info: dist.DistInfo) -> Path:
    """Atomic checkpoint (see checkpoint.py): full weights and optimizer state from rank 0, and each
    rank's RNG, sampler position and routing buffers."""
    root = run_dir / "checkpoints"
    if mode == "fsdp" and info.enabled:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(model, options=opts)
        optim_state = get_optimizer_state_dict(model, optimizer, options=opts)
    else:
        model_state, optim_state = model.state_dict(), optimizer.state_dict()
    if info.is_main:
        ckpt.begin_checkpoint(root, step)
    dist.barrier()
    tmp = ckpt.tmp_checkpoint_dir(root, step)
    if info.is_main:
        meta = {"step": step, "tokens": tokens, "world_size": info.world_size, "dist_mode": mode}
        ckpt.save_weights(model_state, model.config, tmp, meta)
        ckpt.save_torch(optim_state, tmp / "optimizer.pt")
    persistent = model.state_dict().keys()  # routing statistics, not the RoPE tables
    buffers = {k: v.detach().cpu().clone() for k, v in model.named_buffers() if k in persistent}
    ckpt.save_torch({"rng": ckpt.rng_state(), "sampler": sampler.state_dict(), "buffers": buffers},
                    tmp / f"state_rank{info.rank}.pt")
    dist.barrier()
    final = root / ckpt.checkpoint_name(step)
    if info.is_main:
        final = ckpt.commit_checkpoint(root, step, run.train.keep_last, run.train.keep_every)
    dist.barrier()
    return final


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


def default_data_dir(run: RunConfig) -> Path:
    """A cache directory named after the sources and tokenizer, shared by runs on the same data."""
    d = run.data
    key = json.dumps([[str(Path(s).resolve()) for s in d.sources], d.tokenizer, d.val_fraction, d.text_field])
    name = Path(d.sources[0]).stem if d.sources else "shakespeare"
    tok = d.tokenizer.replace(":", "") if not Path(d.tokenizer).exists() else "tok"
    root = Path(os.environ.get("UNIPOOL_CACHE", Path.home() / ".cache" / "unipool"))
    return root / "data" / f"{name}-{tok}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def prepare_data(run: RunConfig, info: dist.DistInfo):
    """Tokenizer and prepared token shards; rank 0 prepares, the others wait and reuse."""
    from unipool.data.dataset import TokenDataset, default_corpus_files, prepare
    from unipool.data.tokenizer import Tokenizer, get_tokenizer

    d = run.data
    data_dir = Path(d.data_dir) if d.data_dir else default_data_dir(run)
    files = d.sources or default_corpus_files()
    if info.is_main:
        cached = data_dir / "tokenizer.json"
        tok = Tokenizer.load(cached) if d.tokenizer.startswith("bpe:") and cached.is_file() \
            else get_tokenizer(d.tokenizer, files)
        prepare(files, data_dir, tok, val_fraction=d.val_fraction, text_field=d.text_field)
    dist.barrier()
    train_ds, val_ds = TokenDataset(data_dir, "train"), TokenDataset(data_dir, "val")
    return train_ds.tokenizer(), train_ds, val_ds, data_dir


# ---- the loop ----------------------------------------------------------------------------------------

def train(run: RunConfig, resume: str | Path | None = None) -> dict:
    """Train as `run` says (resuming from RUN's latest checkpoint if given); returns the summary."""
    from unipool.data.dataset import WindowSampler, unigram_loss

    t_start = time.time()
    tc = run.train
    info = dist.init("cuda" if tc.device.startswith("cuda") or (tc.device == "auto" and torch.cuda.is_available())
                     else "cpu")
    mode = tc.distributed if tc.distributed != "none" or not info.enabled else "ddp"
    if mode == "fsdp" and run.model.fused_pool_wgrad:
        # The deferred weight gradient reads the pool's weights outside the pool's own forward, where
        # FSDP2 has them sharded: not supported until that is handled.
        raise ConfigError("model.fused_pool_wgrad: not supported with train.distributed=fsdp yet")
    device = resolve_device(tc.device, info.local_rank)
    if tc.batch_size % info.world_size:
        raise ConfigError(f"train.batch_size: {tc.batch_size} is not divisible by {info.world_size} ranks")
    if tc.seq_len > run.model.max_seq_len:
        raise ConfigError(f"train.seq_len: {tc.seq_len} exceeds model.max_seq_len={run.model.max_seq_len}")

    # -- run directory and config (on resume: refuse a model the checkpoint cannot hold) --
    resume_dir = None
    if resume is not None:
        run_dir = Path(resume)
        resume_dir = ckpt.resolve_checkpoint(run_dir)
        saved = ckpt.read_meta(resume_dir)
        saved_run = apply_dict(default_config(), load_config_file(run_dir / "config.json"))
        saved_run.model = ModelConfig.from_dict(saved["model"])  # the weights' own config decides
        bad = resume_incompatibilities(saved_run, run)
        if bad:
            raise ckpt.CheckpointError(f"cannot resume {run_dir}: the config differs in {', '.join(bad)}")
        if saved.get("world_size", 1) != info.world_size:
            raise ckpt.CheckpointError(f"cannot resume {resume_dir}: written by {saved.get('world_size')} "
                                       f"process(es), now {info.world_size}")
    else:
        name = tc.run_name or f"{run.preset}-{datetime.now():%Y%m%d-%H%M%S}"
        run_dir = Path(tc.out_dir) / dist.broadcast_object(name)
        if (run_dir / "config.json").exists():
            raise ConfigError(f"train.run_name: {run_dir} already holds a run; use --resume {run_dir} or another name")

    tokenizer, train_ds, val_ds, data_dir = prepare_data(run, info)
    if resume_dir is None:
        run.model.vocab_size = tokenizer.vocab_size  # the tokenizer decides the vocabulary
        run.data.data_dir = str(data_dir)
    elif run.model.vocab_size != tokenizer.vocab_size:
        raise ckpt.CheckpointError(f"cannot resume {run_dir}: the tokenizer has {tokenizer.vocab_size} "
                                   f"tokens, the checkpoint {run.model.vocab_size}")
    run.model.validate()
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(run.to_dict(), indent=2) + "\n")
        tokenizer.save(run_dir / "tokenizer.json")
        ckpt.remove_stale_tmp(run_dir / "checkpoints")

    # -- model: meta -> init (or checkpoint weights) -> wrap -> optimizer --
    torch.manual_seed(tc.seed)
    model = build_model(run.model, device, init=resume_dir is None)
    if resume_dir is not None:
        try:
            model.load_state_dict({k: v.to(device) for k, v in ckpt.load_weights(resume_dir).items()})
        except RuntimeError as e:  # weights that do not match their own meta.json
            raise ckpt.CheckpointError(f"{resume_dir}: weights do not match the config: "
                                       f"{str(e).splitlines()[-1].strip()}") from None
    model.activation_checkpointing = tc.activation_checkpointing
    wrapped = dist.wrap(model, mode, device)
    step_fn = torch.compile(wrapped) if tc.compile else wrapped
    # The fused kernel is ~6x faster than foreach on CPU (measured on 24M parameters) and exact.
    optimizer = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr, betas=(tc.beta1, tc.beta2),
                                  eps=tc.eps, fused=device.type in ("cpu", "cuda"))
    micro_bsz = tc.batch_size // info.world_size
    sampler = WindowSampler(train_ds, micro_bsz, tc.seq_len, seed=tc.seed, rank=info.rank,
                            world_size=info.world_size)
    tokens_per_step = tc.batch_size * tc.seq_len * tc.grad_accum
    total_steps = tc.total_steps(tokens_per_step)

    step = 0
    if resume_dir is not None:
        step = int(ckpt.read_meta(resume_dir)["step"])
        optim_state = ckpt.load_torch(resume_dir / "optimizer.pt")
        if mode == "fsdp" and info.enabled:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(model, optimizer, optim_state, options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(optim_state)
        state = ckpt.load_torch(resume_dir / f"state_rank{info.rank}.pt")
        sampler.load_state_dict(state["sampler"])
        with torch.no_grad():
            for name, buf in model.named_buffers():
                if name in state["buffers"]:
                    buf.copy_(state["buffers"][name])
        ckpt.set_rng_state(state["rng"])
        dist.print0(f"resumed {run_dir} at step {step}")

    # auto: fp32 on CPU, where even native bf16 (AVX512-BF16, Zen 4) measured slower than fp32 at
    # the small shapes CPU runs use (1.22x slower tokens/s on the CPU study's model).
    want_bf16 = tc.precision == "bf16" or (tc.precision == "auto" and device.type == "cuda")
    use_bf16 = want_bf16 and bf16_supported(device)
    if want_bf16 and not use_bf16:
        dist.print0(f"note: {device} has no native bf16 matmul; training in fp32")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
    metrics = Metrics(run_dir, info.is_main, tc.tensorboard, step if resume_dir is not None else None)
    counts = model.param_counts()
    try:  # name the preset only when the model is exactly that preset
        label = run.preset if run.model == get_preset(run.preset) else "custom"
    except ConfigError:
        label = "custom"
    dist.print0(f"run {run_dir}: {label} {run.model.moe_mode}, {counts['total'] / 1e6:.1f}M params "
                f"({counts['active'] / 1e6:.1f}M active), {train_ds.n_tokens:,} train tokens, {total_steps} steps "
                f"x {tokens_per_step:,} tokens, {device}" + (f", {mode} x{info.world_size}" if info.enabled else ""))

    # -- the loop --
    start_step = step
    from tqdm import tqdm

    bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True,
               disable=not (info.is_main and tc.progress))
    counts_LE = torch.zeros(run.model.n_layers, run.model.n_routed_experts, device=device)
    train_time, interval_t0, interval_tokens, val_loss = 0.0, time.time(), 0, None
    stopped = False
    with StopFlag() as stop:
        while step < total_steps:
            t0 = time.time()
            lr = lr_at(step, total_steps, tc.lr, tc.min_lr, tc.warmup_frac)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros(2, device=device)  # lm loss, aux loss (summed over micro-batches)
            for micro in range(tc.grad_accum):
                x, y = sampler.next_batch()
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with dist.no_sync(wrapped, mode, skip=micro < tc.grad_accum - 1):
                    with autocast:
                        out: ModelOutput = step_fn(x, y)
                    model.update_routing_state(out)
                    ((out.loss + out.aux_loss) / tc.grad_accum).backward()
                loss_sum += torch.stack([out.loss.detach().float(), out.aux_loss.detach().float()])
                counts_LE += torch.stack([r.counts_E for r in out.routing])
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip if tc.grad_clip > 0 else math.inf)
            if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
                grad_norm = grad_norm.full_tensor()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            train_time += time.time() - t0
            interval_tokens += tokens_per_step
            bar.update(1)

            last = step == total_steps
            if step % tc.log_interval == 0 or last:
                losses = dist.all_reduce_sum(loss_sum / tc.grad_accum) / info.world_size
                tok_per_s = interval_tokens / max(time.time() - interval_t0, 1e-9)
                record = {"step": step, "tokens": step * tokens_per_step, "loss": float(losses[0]),
                          "aux_loss": float(losses[1]), "lr": lr, "grad_norm": float(grad_norm),
                          "tok_per_s": round(tok_per_s, 1)}
                if tc.routing_interval and (step % tc.routing_interval == 0 or last):
                    record["routing"] = routing_stats(dist.all_reduce_sum(counts_LE.clone()), model)
                    counts_LE.zero_()
                metrics.log(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{tok_per_s:,.0f}", refresh=False)
                interval_t0, interval_tokens = time.time(), 0
            if (tc.eval_interval and step % tc.eval_interval == 0) or last:
                val_loss = evaluate(wrapped, val_ds, micro_bsz, tc.seq_len, tc.eval_tokens or None, autocast, info, device)
                metrics.log({"step": step, "tokens": step * tokens_per_step, "val_loss": val_loss,
                             "val_ppl": math.exp(min(val_loss, 50))})
                interval_t0 = time.time()
            if info.enabled:
                stop.set = bool(dist.all_reduce_sum(torch.tensor(float(stop.set), device=device)) > 0)
            if (tc.ckpt_interval and step % tc.ckpt_interval == 0) or last or stop.set:
                save_checkpoint(run_dir, step, step * tokens_per_step, model, optimizer, sampler, run, mode, info)
                interval_t0 = time.time()
            if stop.set and not last:
                stopped = True
                break
    bar.close()

    # -- summary --
    summary = {"run_dir": str(run_dir), "step": step, "tokens": step * tokens_per_step,
               "interrupted": stopped, "wall_time_s": round(time.time() - t_start, 2),
               "train_time_s": round(train_time, 2)}
    if not stopped:
        if val_loss is None:  # resumed a run that had already finished
            val_loss = evaluate(wrapped, val_ds, micro_bsz, tc.seq_len, tc.eval_tokens or None, autocast, info, device)
        unigram = unigram_loss(train_ds, val_ds)
        tok_s = tokens_per_step * (step - start_step) / max(train_time, 1e-9)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        peak_rss_mb = usage.ru_maxrss / 1024
        summary.update({
            "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50)), "unigram_loss": unigram,
            "unigram_ppl": math.exp(unigram), "tok_per_s": round(tok_s, 1), "peak_rss_mb": round(peak_rss_mb, 1),
            "peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else None,
            "cpu_time_s": round(usage.ru_utime + usage.ru_stime, 1), "precision": "bf16" if use_bf16 else "fp32",
            "params": counts["total"], "active_params": counts["active"],
        })
        text = sample(model, tokenizer, tc.sample_prompt, tc.sample_tokens, tc.seed) if tc.sample_tokens else ""
        summary["sample"] = tc.sample_prompt + text
        if info.is_main:
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        dist.print0(f"val loss {val_loss:.3f} (ppl {summary['val_ppl']:.1f})  |  unigram baseline {unigram:.3f} "
                    f"(ppl {summary['unigram_ppl']:.1f})  |  {tok_s:,.0f} tok/s, peak RSS {peak_rss_mb:,.0f} MB, "
                    f"{summary['wall_time_s']:.0f} s")
        if text:
            dist.print0(f"sample: {summary['sample']!r}")
        dist.print0(f"run directory: {run_dir}")
    else:
        dist.print0(f"stopped at step {step}; continue with: unipool train --resume {run_dir}")
    metrics.close()
    return summary


# ---- command line ------------------------------------------------------------------------------------

def add_train_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p)


def cmd_train(args: argparse.Namespace) -> int:
    run = resolve_config(args)
    try:
        summary = train(run, resume=args.resume)
    finally:
        dist.teardown()
    return 130 if summary["interrupted"] else 0


def main(argv: list[str] | None = None) -> int:
    """`python -m unipool.train ...` (and torchrun -m unipool.train) = `unipool train ...`."""
    from unipool.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])
