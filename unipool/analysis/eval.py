"""`unipool eval`: validation loss and perplexity of a run or checkpoint on any tokenized text.

Evaluation sets:
- default: the run's own validation split (the prepared data directory named in RUN/config.json);
- `--data DIR`: a data directory written by `unipool.data.prepare` (index.json + shards);
- `--data FILE`: raw text (.txt/.md, documents split at form feeds), JSON lines (.jsonl[.zst|.gz],
  field `--text-field`), parquet, or a folder of those, tokenized on the fly with the run's
  tokenizer; every document is followed by EOS, exactly as `data.prepare` lays out training data.

`evaluate` is exact: the loss is the sum of per-token cross-entropies over every target token,
divided by the number of target tokens (no averaging of batch means), accumulated in float64.
The helpers `load_run` / `eval_batches_for` are shared by `routing` and `generate`.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from unipool import errors
from unipool.errors import UnipoolError
from unipool.model.model import Unipool
from unipool.train.checkpoint import load_model, resolve_checkpoint

Batch = tuple[torch.Tensor, torch.Tensor]  # inputs (B, S), targets (B, S); -100 = ignored target


class EvalError(UnipoolError):
    pass


# ---- loading a run -----------------------------------------------------------------------------

@dataclass
class LoadedRun:
    model: Unipool
    meta: dict  # the checkpoint's meta.json
    ckpt_dir: Path
    run_dir: Path | None  # the directory holding config.json, if the checkpoint sits in a run
    config: dict  # RUN/config.json ({} without a run directory)

    @property
    def step(self) -> int | None:
        return self.meta.get("step")

    @property
    def train_seq_len(self) -> int | None:
        return (self.config.get("train") or {}).get("seq_len")

    def tokenizer_path(self) -> Path:
        for d in (self.ckpt_dir, self.run_dir):
            if d is not None and (d / "tokenizer.json").is_file():
                return d / "tokenizer.json"
        raise EvalError(f"no tokenizer.json in {self.ckpt_dir}" + (f" or {self.run_dir}" if self.run_dir else ""))

    def tokenizer(self):
        from unipool.data.tokenizer import Tokenizer

        return Tokenizer.load(self.tokenizer_path())


def find_run_dir(ckpt_dir: Path) -> Path | None:
    """RUN for RUN/checkpoints/step_X (or a checkpoint that is itself a run directory)."""
    for d in (ckpt_dir, ckpt_dir.parent, ckpt_dir.parent.parent):
        if (d / "config.json").is_file():
            return d
    return None


def read_json(path: Path) -> dict:
    return errors.read_json(path, EvalError)


def load_run(path: str | Path, device: str | torch.device = "cpu") -> LoadedRun:
    """Model, checkpoint metadata and run config from a run directory, checkpoint dir or weights file."""
    ckpt_dir = resolve_checkpoint(path)
    model, meta = load_model(ckpt_dir, device)
    model.eval()
    run_dir = find_run_dir(ckpt_dir)
    config = read_json(run_dir / "config.json") if run_dir else {}
    return LoadedRun(model, meta, ckpt_dir, run_dir, config)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# ---- batches -----------------------------------------------------------------------------------

def window_batches(tokens: list[int] | torch.Tensor, batch_size: int, seq_len: int,
                   max_tokens: int | None = None) -> Iterator[Batch]:
    """Non-overlapping next-token windows over one token stream, in order, covering all of it.

    Window w predicts tokens[w*S + 1 : (w+1)*S + 1] from the S tokens before each. Full windows come
    in batches of `batch_size`; a shorter final window (the stream's tail) comes alone.
    """
    stream = torch.as_tensor(tokens, dtype=torch.long)
    if max_tokens is not None:
        stream = stream[: max_tokens + 1]
    n_targets = stream.numel() - 1
    if n_targets < 1:
        raise EvalError("need at least 2 tokens to evaluate")
    n_full = n_targets // seq_len
    for start in range(0, n_full, batch_size):
        rows = range(start, min(start + batch_size, n_full))
        x = torch.stack([stream[r * seq_len:(r + 1) * seq_len] for r in rows])
        y = torch.stack([stream[r * seq_len + 1:(r + 1) * seq_len + 1] for r in rows])
        yield x, y
    if n_targets % seq_len:
        begin = n_full * seq_len
        yield stream[begin:-1].unsqueeze(0), stream[begin + 1:].unsqueeze(0)


def text_tokens(path: str | Path, tokenizer, text_field: str = "text") -> list[int]:
    """Tokenize raw sources (text, jsonl, parquet, a folder of them) as `data.prepare` does: the same
    documents, each followed by EOS."""
    from unipool.data.corpus import iter_documents, resolve_sources

    docs = [doc for _, doc in iter_documents(resolve_sources([path]), text_field)]
    if not docs:
        raise EvalError(f"{path} holds no text")
    tokens: list[int] = []
    for ids in tokenizer.encode_batch(docs):
        tokens.extend(ids)
        tokens.append(tokenizer.eos_id)
    return tokens


def run_data_dir(run: LoadedRun) -> Path:
    """The prepared data directory a run trained on, from RUN/config.json's data section."""
    value = (run.config.get("data") or {}).get("data_dir")
    if isinstance(value, str) and value:
        # A relative data_dir is relative to where training ran: try there, then beside the run.
        candidates = [Path(value)] + ([run.run_dir.parent / value, run.run_dir.parent.parent / value]
                                      if run.run_dir and not Path(value).is_absolute() else [])
        for path in candidates:
            if (path / "index.json").is_file():
                return path
        raise EvalError(f"the run's data directory {value} is not there (or not prepared); pass --data")
    where = run.run_dir / "config.json" if run.run_dir else f"{run.ckpt_dir} (not inside a run directory)"
    raise EvalError(f"no prepared data directory found in {where}; pass --data")


def eval_batches_for(run: LoadedRun, data: str | Path | None, split: str, batch_size: int, seq_len: int,
                     max_tokens: int | None = None, text_field: str = "text") -> tuple[Iterable[Batch], str]:
    """Batches for `run` from a prepared dir, a raw text/jsonl file, or the run's own split.

    Returns (batches, description of the source)."""
    if data is None:
        path = run_data_dir(run)
    else:
        path = Path(data)
        if not path.exists():
            raise EvalError(f"no such data file or directory: {path}")
    if (path / "index.json").is_file():
        from unipool.data.dataset import TokenDataset, eval_batches

        if split not in ("train", "val"):
            raise EvalError(f"--split must be 'train' or 'val', got {split!r}")
        dataset = TokenDataset(path, split)
        if dataset.vocab_size > run.model.config.vocab_size:
            raise EvalError(f"{path} was tokenized with a vocabulary of {dataset.vocab_size}, "
                            f"larger than the model's {run.model.config.vocab_size}")
        return eval_batches(dataset, batch_size, seq_len, max_tokens), f"{path} ({split})"
    tokens = text_tokens(path, run.tokenizer(), text_field)
    return window_batches(tokens, batch_size, seq_len, max_tokens), str(path)


# ---- evaluation --------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: Unipool, batches: Iterable[Batch], *, device: str | torch.device | None = None,
             autocast_dtype: torch.dtype | None = None) -> dict:
    """Mean next-token cross-entropy (nats/token) over every target token of `batches`.

    Returns {"loss", "ppl", "tokens", "batches"}. Targets equal to -100 are not counted.
    The model is put in eval mode for the duration and restored afterwards.
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
    finally:
        model.train(was_training)
    if n_tokens == 0:
        raise EvalError("no tokens to evaluate")
    loss = total / n_tokens
    return {"loss": loss, "ppl": math.exp(loss), "tokens": n_tokens, "batches": n_batches}


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
    seq_len = args.seq_len or min(train_seq_len or model.config.max_seq_len, model.config.max_seq_len)
    if not 1 <= seq_len <= model.config.max_seq_len:
        raise EvalError(f"--seq-len must be between 1 and the model's max_seq_len={model.config.max_seq_len}")
    if args.batch_size < 1:
        raise EvalError("--batch-size must be positive")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise EvalError("--max-tokens must be positive")
    return seq_len


def add_eval_args(p: argparse.ArgumentParser) -> None:
    add_data_args(p, max_tokens=None)
    p.add_argument("--bf16", action="store_true", help="run the forward pass under bf16 autocast")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def cmd_eval(args: argparse.Namespace) -> int:
    run = load_run(args.run, args.device or default_device())
    seq_len = check_data_args(args, run.model, run.train_seq_len)
    batches, source = eval_batches_for(run, args.data, args.split, args.batch_size, seq_len,
                                       args.max_tokens, args.text_field)
    result = evaluate(run.model, batches, autocast_dtype=torch.bfloat16 if args.bf16 else None)
    result = {"checkpoint": str(run.ckpt_dir), "step": run.step, "data": source, "seq_len": seq_len, **result}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{run.ckpt_dir} (step {run.step}) on {source}: loss {result['loss']:.4f}  "
              f"ppl {result['ppl']:.2f}  over {result['tokens']:,} tokens")
    return 0

