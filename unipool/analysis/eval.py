"""`unipool eval`: validation loss and perplexity of a run or checkpoint on any tokenized text.

Evaluation sets:
- default: the run's own validation split (the prepared data directory named in RUN/config.json);
- `--data DIR`: a data directory written by `unipool.data.prepare` (index.json + shards);
- `--data FILE`: raw text (.txt/.md, documents split at form feeds), JSON lines (.jsonl[.zst|.gz],
  field `--text-field`), parquet, or a folder of those, tokenized on the fly with the run's
  tokenizer; every document is followed by EOS, exactly as `data.prepare` lays out training data.

`evaluate` is exact: the loss is the sum of per-token cross-entropies over every target token,
divided by the number of target tokens (no averaging of batch means). Each batch's sum is a float32
reduction; the sums are accumulated over batches in float64. It is
the one evaluation of the package: training's validation calls it too, once per rank.
`eval_batches_for` is shared by `routing` and `probe`.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from unipool.data.dataset import (
    TokenDataset,
    eval_batches,
    prepared_fingerprint,
    text_tokens,
    tokenizer_matches,
    window_batches,
)
from unipool.errors import UnipoolError
from unipool.model.model import Unipool
from unipool.run import Run, default_device

Batch = tuple[torch.Tensor, torch.Tensor]  # inputs (B, S), targets (B, S); -100 = ignored target


class EvalError(UnipoolError):
    pass


# ---- batches -----------------------------------------------------------------------------------

def eval_batches_for(run: Run, data: str | Path | None, split: str, batch_size: int, seq_len: int,
                     max_tokens: int | None = None, text_field: str = "text") -> tuple[Iterable[Batch], str]:
    """Batches for `run` from a prepared dir, a raw text/jsonl file, or the run's own split.

    Returns (batches, description of the source)."""
    if data is None:
        path = run.data_dir()
    else:
        path = Path(data)
        if not path.exists():
            raise EvalError(f"no such data file or directory: {path}")
    if (path / "index.json").is_file():
        if split not in ("train", "val"):
            raise EvalError(f"--split must be 'train' or 'val', got {split!r}")
        dataset = TokenDataset(path, split)
        check_data_tokenizer(run, path)
        vocab_size = run.model_config.vocab_size
        if dataset.vocab_size > vocab_size:
            raise EvalError(f"{path} was tokenized with a vocabulary of {dataset.vocab_size}, "
                            f"larger than the model's {vocab_size}")
        return eval_batches(dataset, batch_size, seq_len, max_tokens), f"{path} ({split})"
    tokens = text_tokens(path, run.tokenizer(), text_field)
    return window_batches(tokens, batch_size, seq_len, max_tokens, str(path)), str(path)


def check_data_tokenizer(run: Run, data_dir: Path) -> None:
    """Refuse prepared data tokenized with another tokenizer than the run's (its ids would mean other
    text: the loss would be a number about nothing). A checkpoint without a tokenizer is not checked."""
    try:
        tokenizer = run.tokenizer()
    except UnipoolError:
        return
    if not tokenizer_matches(data_dir, tokenizer):
        raise EvalError(f"{data_dir} was prepared with another tokenizer (fingerprint "
                        f"{prepared_fingerprint(data_dir)}) than the model's {run.tokenizer_path()} (fingerprint "
                        f"{tokenizer.fingerprint}); prepare it with --tokenizer {run.tokenizer_path()}")


# ---- evaluation --------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Batch], *, device: str | torch.device | None = None,
             autocast_dtype: torch.dtype | None = None, calls: int = 0) -> dict:
    """Mean next-token cross-entropy (nats/token) over every target token of `batches`.

    Returns {"loss", "ppl", "tokens", "batches", "loss_sum"}; targets equal to -100 are not counted.
    `calls`: run at least this many forwards, the extra ones on a dummy token and not counted (under
    FSDP every rank must join the same number of forwards). The model is put in eval mode for the
    duration and restored afterwards.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, n_tokens, n_batches = 0.0, 0, 0
    try:
        for inputs, targets in batches:
            inputs, targets = inputs.to(device), targets.to(device)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits = model(inputs).logits
            total += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                     ignore_index=-100, reduction="sum").double().item()
            n_tokens += int((targets != -100).sum())
            n_batches += 1
        for _ in range(calls - n_batches):
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                model(torch.zeros(1, 1, dtype=torch.long, device=device))
    finally:
        model.train(was_training)
    if n_tokens == 0 and not calls:
        raise EvalError("no tokens to evaluate")
    loss = total / max(n_tokens, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50)), "tokens": n_tokens, "batches": n_batches, "loss_sum": total}


# ---- CLI ---------------------------------------------------------------------------------------

def add_data_args(p: argparse.ArgumentParser, max_tokens: int | None) -> None:
    """Flags shared with `unipool routing`."""
    p.add_argument("run", metavar="RUN_OR_CKPT", help="run directory, checkpoint directory or model.safetensors")
    p.add_argument("--data", help="prepared data directory, or raw .txt / .jsonl / .parquet file(s) "
                                  "(default: the run's own prepared data)")
    p.add_argument("--split", default="val", choices=("train", "val"), help="split of a prepared data directory")
    p.add_argument("--text-field", default="text", help="JSON field holding the text in a .jsonl file")
    p.add_argument("--max-tokens", type=int, default=max_tokens,
                   help=f"evaluate at most this many target tokens (default: {max_tokens or 'all'})")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--seq-len", type=int, default=None,
                   help="window length (default: the run's training seq_len, else the model's max_seq_len)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")


def check_data_args(args: argparse.Namespace, model: Unipool, train_seq_len: int | None = None) -> int:
    """Validate the shared flags against the model; returns the window length (default: training's)."""
    max_len = model.config.max_seq_len
    if args.seq_len is not None and not 1 <= args.seq_len <= max_len:
        raise EvalError(f"--seq-len must be between 1 and the model's max_seq_len={max_len}")
    seq_len = args.seq_len or min(train_seq_len or max_len, max_len)
    if args.batch_size < 1:
        raise EvalError("--batch-size must be positive")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise EvalError("--max-tokens must be positive")
    return seq_len


def data_for(args: argparse.Namespace, run: Run, model: Unipool) -> tuple[int, Iterable[Batch], str]:
    """The analysis commands' shared preamble after the model is loaded (eval, routing, report, probe): the
    data flags checked against the model, then (window length, batches, description of the source)."""
    seq_len = check_data_args(args, model, run.train_seq_len)
    batches, source = eval_batches_for(run, args.data, args.split, args.batch_size, seq_len, args.max_tokens,
                                       args.text_field)
    return seq_len, batches, source


def open_with_data(args: argparse.Namespace) -> tuple[Run, Unipool, int, Iterable[Batch], str]:
    """Open the run, load its newest model, check the data flags, make the batches: (run, model, seq_len,
    batches, source)."""
    run = Run.open(args.run)
    model = run.load_model(args.device or default_device())
    return run, model, *data_for(args, run, model)


def add_eval_args(p: argparse.ArgumentParser) -> None:
    add_data_args(p, max_tokens=None)
    p.add_argument("--bf16", action="store_true", help="run the forward pass under bf16 autocast")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def cmd_eval(args: argparse.Namespace) -> int:
    run, model, seq_len, batches, source = open_with_data(args)
    result = evaluate(model, batches, autocast_dtype=torch.bfloat16 if args.bf16 else None)
    result.pop("loss_sum")
    ckpt = run.latest_checkpoint()
    result = {"checkpoint": str(ckpt), "step": run.step, "data": source, "seq_len": seq_len, **result}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{ckpt} (step {run.step}) on {source}: loss {result['loss']:.4f}  "
              f"ppl {result['ppl']:.2f}  over {result['tokens']:,} tokens")
    return 0

