"""Reading prepared and raw data: a prepared split (`TokenDataset`), the training sampler, and the one
windowing of evaluation (`eval_batches`, over a prepared split or raw text tokenized on the fly).

A prepared directory (written by unipool.data.prepare):
    index.json        shard files and token counts per split, dtype, vocab size, fingerprints
    train_000.bin     flat token ids (uint16 when the vocab fits, else uint32), EOD after each document
    val_000.bin       ...
    tokenizer.json
WindowSampler is epoch-free and stateless per step: batch `s` is drawn from a generator seeded with
(seed, s), so resuming needs only the step counter.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from unipool.data.corpus import PIECE_CHARS, DataError, iter_documents, iter_pieces, resolve_sources
from unipool.data.tokenizer import Tokenizer, TokenizerError

FORMAT_VERSION = 1
SPLITS = ("train", "val")


def read_index(data_dir: Path) -> dict | None:
    try:
        index = json.loads((data_dir / "index.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return index if isinstance(index, dict) else None  # valid JSON but no index: as good as none


class TokenDataset:
    """One split ("train" | "val") of a prepared directory: its shards memory-mapped, validated against index.json."""

    def __init__(self, data_dir: str | Path, split: str = "train"):
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}: expected one of {SPLITS}")
        self.data_dir, self.split = Path(data_dir), split
        index = read_index(self.data_dir)
        if index is None:
            raise DataError(f"not a prepared dataset (no readable index.json): {self.data_dir}")
        if index.get("version") != FORMAT_VERSION:
            raise DataError(f"dataset format {index.get('version')} is not {FORMAT_VERSION}: {self.data_dir}")
        self.index = index
        try:
            self.dtype = np.dtype(index["dtype"])
            self.vocab_size: int = index["vocab_size"]
            self.eos_id: int = index["eos_id"]
            info = index["splits"][split]
            self.n_documents: int = info["n_documents"]
            shards = [(sh["file"], int(sh["n_tokens"])) for sh in info["shards"]]
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"malformed index.json in {self.data_dir}: {e!r}") from None
        self.tokenizer_path = self.data_dir / "tokenizer.json"
        self.shards: list[np.memmap] = []
        for file, n in shards:
            path = self.data_dir / file
            expected = n * self.dtype.itemsize
            found = path.stat().st_size if path.is_file() else None
            if found != expected:
                raise DataError(
                    f"corrupt shard {path}: expected {expected} bytes, found "
                    f"{'no file' if found is None else found} (run prepare again)"
                )
            if n:
                self.shards.append(np.memmap(path, dtype=self.dtype, mode="r", shape=(n,)))
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])  # global start of each shard
        self.n_tokens: int = int(self.offsets[-1])

    def __len__(self) -> int:
        return self.n_tokens

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the split, across shard boundaries."""
        if start < 0 or start + length > self.n_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) outside a split of {self.n_tokens}")
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        parts = []
        while length > 0:
            lo = start - int(self.offsets[i])
            take = min(length, len(self.shards[i]) - lo)
            parts.append(self.shards[i][lo: lo + take])
            start, length, i = start + take, length - take, i + 1
        return np.concatenate(parts) if len(parts) != 1 else np.array(parts[0])

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.load(self.tokenizer_path)

    def __repr__(self) -> str:
        return f"TokenDataset({str(self.data_dir)!r}, {self.split!r}, n_tokens={self.n_tokens})"


def _to_batch(windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(windows.astype(np.int64))  # (B, S+1)
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()


class WindowSampler:
    """Infinite, seeded stream of random (inputs, targets) windows of `seq_len` tokens.

    Step s draws world_size * batch_size window starts, uniform over the split, from a generator seeded with
    (seed, s); each window is seq_len + 1 tokens, inputs = window[:-1], targets = window[1:].
    Data-parallel rule: rank r takes draws [r * batch_size, (r + 1) * batch_size) of that global batch, so
    the ranks' draws are disjoint and the concatenation over ranks (in rank order) of the ranks' batches at
    step s equals the single-process (world_size=1) batch of size world_size * batch_size at step s.
    Resuming: state_dict() is the step counter (and seed); load_state_dict() continues the exact stream.
    """

    def __init__(self, dataset: TokenDataset, batch_size: int, seq_len: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if dataset.n_tokens < seq_len + 1:
            raise DataError(
                f"{dataset.split} split of {dataset.data_dir} has {dataset.n_tokens} tokens, "
                f"fewer than seq_len + 1 = {seq_len + 1}"
            )
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world_size {world_size}")
        if seed < 0:
            raise DataError(f"the sampler seed must be >= 0, got {seed}")
        self.dataset, self.batch_size, self.seq_len = dataset, batch_size, seq_len
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.step = 0

    def window_starts(self, step: int) -> np.ndarray:
        """Start offsets of the global batch (all ranks) at `step`."""
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, self.dataset.n_tokens - self.seq_len, size=self.world_size * self.batch_size)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self.window_starts(self.step)[self.rank * self.batch_size: (self.rank + 1) * self.batch_size]
        self.step += 1
        return _to_batch(np.stack([self.dataset.read(int(s), self.seq_len + 1) for s in starts]))

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed}

    def load_state_dict(self, d: dict) -> None:
        self.step, self.seed = int(d["step"]), int(d["seed"])


def data_identity(train: TokenDataset, val: TokenDataset) -> dict:
    """What a run trains and validates on, for its checkpoints (a resume on other data says so): the
    sources' fingerprint (paths, sizes, mtimes), the tokenizer's, and the token count of each split."""
    return {"source_fingerprint": train.index.get("source_fingerprint"),
            "tokenizer_fingerprint": train.index.get("tokenizer_fingerprint"),
            "train_tokens": train.n_tokens, "val_tokens": val.n_tokens}


class TokenStream:
    """One token sequence in memory (raw text tokenized on the fly), read like a prepared split."""

    def __init__(self, tokens, source: str = "text"):
        self.tokens = np.asarray(tokens, dtype=np.int64)
        self.n_tokens, self.split, self.data_dir = len(self.tokens), "text", source

    def read(self, start: int, length: int) -> np.ndarray:
        return self.tokens[start: start + length]


def eval_batches(dataset: TokenDataset | TokenStream, batch_size: int, seq_len: int, max_tokens: int | None = None,
                 rank: int = 0, world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic, non-overlapping (inputs, targets) batches over a split or a token stream, in order: the
    one windowing of evaluation (training's validation, `eval`, `routing`, `report`, `probe`).

    Window i predicts targets [i*seq_len + 1, (i+1)*seq_len + 1), so every token after the first is a target
    exactly once. With max_tokens, only the first max_tokens targets. A leftover shorter than seq_len comes
    last as a (1, r) batch. Weight losses by target count. With world_size > 1, rank r gets batches r,
    r + world_size, ...
    """
    n_targets = dataset.n_tokens - 1
    if n_targets < 1:
        raise DataError(f"{dataset.split} split of {dataset.data_dir} is empty" if isinstance(dataset, TokenDataset)
                        else f"{dataset.data_dir}: need at least 2 tokens to evaluate")
    n_windows, tail = divmod(n_targets if max_tokens is None else min(n_targets, max_tokens), seq_len)
    batches = [(i, min(i + batch_size, n_windows)) for i in range(0, n_windows, batch_size)]
    if tail:
        batches.append((n_windows, None))
    for b, (lo, hi) in enumerate(batches):
        if b % world_size != rank:
            continue
        if hi is None:
            yield _to_batch(dataset.read(lo * seq_len, tail + 1)[None])
        else:
            yield _to_batch(np.stack([dataset.read(i * seq_len, seq_len + 1) for i in range(lo, hi)]))


def window_batches(tokens, batch_size: int, seq_len: int, max_tokens: int | None = None,
                   source: str = "text") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`eval_batches` over one token stream (a list or tensor of ids)."""
    return eval_batches(TokenStream(torch.as_tensor(tokens).tolist() if isinstance(tokens, torch.Tensor) else tokens,
                                    source), batch_size, seq_len, max_tokens)


def text_tokens(path: str | Path, tokenizer, text_field: str = "text") -> list[int]:
    """Tokenize raw sources (text, jsonl, parquet, a folder of them) as `data.prepare` does: the same
    documents, each followed by EOS. Our `Tokenizer` reads them in pieces, as prepare does, with a literal
    <|endoftext|> kept as text; another (a transformers tokenizer) sees whole documents."""
    paths = resolve_sources([path])
    tokens: list[int] = []
    if isinstance(tokenizer, Tokenizer):
        pieces: list[str] = []
        ends: list[bool] = []

        def flush() -> None:
            for ids, end in zip(tokenizer.encode_text(pieces), ends):
                tokens.extend(ids)
                if end:
                    tokens.append(tokenizer.eos_id)
            pieces.clear()
            ends.clear()

        n_chars = 0
        for _, piece, last in iter_pieces(paths, text_field):
            if n_chars + len(piece) > PIECE_CHARS:
                flush()
                n_chars = 0
            pieces.append(piece)
            ends.append(last)
            n_chars += len(piece)
        flush()
    else:
        for ids in tokenizer.encode_batch([doc for _, doc in iter_documents(paths, text_field)]):
            tokens.extend(ids)
            tokens.append(tokenizer.eos_id)
    if not tokens:
        raise DataError(f"{path} holds no text")
    return tokens


def prepared_fingerprint(data_dir: Path) -> str | None:
    """The fingerprint of the tokenizer a prepared directory was tokenized with (from index.json)."""
    index = read_index(Path(data_dir)) or {}
    return index.get("tokenizer_fingerprint")


def tokenizer_matches(data_dir: str | Path, tokenizer: Tokenizer) -> bool:
    """Whether the data in `data_dir` was tokenized with `tokenizer`: index.json's fingerprint, or (an index
    written by another `tokenizers` version serializes differently) its tokenizer.json read again now."""
    data_dir = Path(data_dir)
    if prepared_fingerprint(data_dir) == tokenizer.fingerprint:
        return True
    try:
        return Tokenizer.load(data_dir / "tokenizer.json").fingerprint == tokenizer.fingerprint
    except TokenizerError:
        return False


def _blocks(ds: TokenDataset, n: int) -> Iterator[np.ndarray]:
    """A split's tokens in blocks of at most `n`, read (not memory-mapped: a pass over a large split would
    leave all of it mapped into the process)."""
    for shard in ds.shards:
        with open(shard.filename, "rb") as f:
            while (block := np.fromfile(f, dtype=ds.dtype, count=n)).size:
                yield block


def unigram_loss(train_ds: TokenDataset, val_ds: TokenDataset) -> float:
    """Cross-entropy (nats/token) on val of the train split's add-one-smoothed unigram distribution.

    A model that ignores context cannot beat this; a trained LM should be clearly below it.
    """
    V = train_ds.vocab_size
    counts = np.zeros(V, dtype=np.int64)
    step = 1 << 22  # tokens per bincount: its int64 copy stays small
    for block in _blocks(train_ds, step):
        counts += np.bincount(block, minlength=V)
    logp = np.log(counts + 1.0) - np.log(counts.sum() + V)
    if val_ds.n_tokens == 0:
        raise DataError(f"val split of {val_ds.data_dir} is empty")
    total = sum(float(logp[block].sum()) for block in _blocks(val_ds, step))
    return -total / val_ds.n_tokens
