"""Writing prepared data: text sources -> memory-mapped token shards (read by unipool.data.dataset).

prepare(sources, out_dir, tokenizer) tokenizes once, in parallel, into:
    out_dir/index.json        shard files and token counts per split, dtype, vocab size, fingerprints
    out_dir/train_000.bin     flat token ids (uint16 when the vocab fits, else uint32), EOD after each doc
    out_dir/val_000.bin       ...
    out_dir/tokenizer.json
A second call with the same sources (paths, sizes, mtimes), tokenizer and split settings reuses them.

Notable choices:
- Documents, not tokens, are split between train and val: a seeded random choice of documents goes to val,
  so no validation text is ever trained on. A corpus of one document (a single text file without form
  feeds) is split inside it instead: its last `val_fraction` of characters, from a cut that leaves the
  tokens unchanged (`corpus.cut_point`), is the validation split.
- EOD (`<|endoftext|>`) follows every document, as in Megatron/GPT-2 data; windows cross documents. Only
  this inserted EOD separates documents: a literal "<|endoftext|>" in the text is tokenized as text.
- Memory does not grow with the size of a document: documents are tokenized in pieces of at most
  `corpus.PIECE_CHARS` characters (plain text files are streamed), and tokens stream to the shards.
- Writes are atomic: shards go to temporary files, the old index is removed before shards are replaced,
  and the new index is renamed into place last. A dataset without a valid index is not a dataset.
  Temporary directories a killed prepare left behind (`.prepare-<pid>-*`, the pid no longer running)
  are removed by the next prepare of the directory.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import re
import shutil
import sys
import tempfile
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

try:
    import fcntl
except ImportError:  # Windows: no locking between concurrent prepares
    fcntl = None

from unipool.data.corpus import (
    PIECE_CHARS,
    DataError,
    cache_root,
    cut_point,
    default_corpus_files,
    iter_pieces,
    pid_running,
    resolve_sources,
)
from unipool.data.dataset import (
    FORMAT_VERSION,
    SPLITS,
    TokenDataset,
    prepared_fingerprint,
    read_index,
    tokenizer_matches,
    unigram_loss,
)
from unipool.data.tokenizer import Tokenizer, TokenizerError, atomic_write_text, get_tokenizer

# How text becomes tokens; part of the source fingerprint, so data prepared another way is prepared again.
# 2: pieces, a literal <|endoftext|> stays text, a single document's tail is val.
TOKENIZATION = 2
MAX_SHARD_TOKENS = 1 << 28  # 512 MB per uint16 shard
CHUNK_CHARS = 1 << 20  # document pieces are sent to tokenizer workers in chunks of about this many characters
TMP_PREFIX = ".prepare-"  # + "<pid>-<random>": a prepare's temporary directory inside the output directory


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# --- prepare ----------------------------------------------------------------------------------------------

def _source_fingerprint(paths: list[Path], text_field: str, val_fraction: float, seed: int) -> str:
    h = hashlib.sha256(json.dumps([FORMAT_VERSION, TOKENIZATION, text_field, val_fraction, seed]).encode())
    for p in paths:
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            st = f.stat()
            h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


_worker_tok: Tokenizer | None = None  # set in each pool worker by _init_worker


def _init_worker(tok_json: str) -> None:
    global _worker_tok
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already; no nested threads
    _worker_tok = Tokenizer.from_str(tok_json)


def _tokenize_docs(tok: Tokenizer, args: tuple[list[str], list[tuple[bool, bool]], str]):
    """Tokenize a chunk of document pieces: (n documents ended, train tokens, val tokens); each piece is
    (is_val, ends_document), and EOD follows a document's last piece. The tokenizer sees at most about
    PIECE_CHARS characters per call: its memory per character is large (~130 bytes)."""
    pieces, flags, dtype = args
    out: dict[bool, list[np.ndarray]] = {False: [], True: []}
    eod = np.array([tok.eos_id], dtype=dtype)
    lo = 0
    while lo < len(pieces):
        hi, n_chars = lo, 0
        while hi < len(pieces) and (hi == lo or n_chars + len(pieces[hi]) <= PIECE_CHARS):
            n_chars += len(pieces[hi])
            hi += 1
        for ids, (is_val, ends) in zip(tok.encode_text(pieces[lo:hi]), flags[lo:hi]):
            out[is_val].append(np.array(ids, dtype=dtype))
            if ends:
                out[is_val].append(eod)
        lo = hi
    n = sum(ends for _, ends in flags)
    return (n, *(np.concatenate(out[v]) if out[v] else np.zeros(0, dtype) for v in (False, True)))


def _tokenize_chunk(args):
    return _tokenize_docs(_worker_tok, args)


def _bounded_imap(pool, fn, items, depth: int):
    """Ordered pool.imap that keeps at most `depth` chunks in flight (Pool.imap reads its input eagerly)."""
    pending = deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= depth:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


class _ShardWriter:
    """Appends tokens to `<split>_NNN.bin` temporary files in `tmp_dir`, starting a new shard when full."""

    def __init__(self, tmp_dir: Path, split: str, max_tokens: int):
        self.tmp_dir, self.split, self.max_tokens = tmp_dir, split, max_tokens
        self.shards: list[dict] = []
        self.f = None

    def write(self, arr: np.ndarray) -> None:
        while arr.size:
            if self.f is None or self.shards[-1]["n_tokens"] == self.max_tokens:
                self._next()
            room = self.max_tokens - self.shards[-1]["n_tokens"]
            self.f.write(arr[:room].tobytes())
            self.shards[-1]["n_tokens"] += min(room, arr.size)
            arr = arr[room:]

    def _next(self) -> None:
        if self.f is not None:
            self.f.close()
        name = f"{self.split}_{len(self.shards):03d}.bin"
        self.shards.append({"file": name, "n_tokens": 0})
        self.f = open(self.tmp_dir / name, "wb")  # noqa: SIM115 -- closed in close()

    def close(self) -> list[dict]:
        if self.f is not None:
            self.f.close()
        return self.shards


def _pieces(paths, text_field, is_val: np.ndarray, val_from: int | None) -> Iterator[tuple[str, bool, bool]]:
    """(piece, is_val, ends_document) for every document piece, with the split chosen in pass 1: per
    document from `is_val`, or, for a single document split inside (`val_from` set), by character: the
    piece holding character `val_from` is cut (as `cut_point` cuts) and val is all that follows."""
    n_docs, pos = 0, 0
    for path, piece, last in iter_pieces(paths, text_field):
        if n_docs == len(is_val):
            raise DataError(f"a source changed while it was being prepared: {path}")
        if val_from is None:
            yield piece, bool(is_val[n_docs]), last
        elif pos + len(piece) <= val_from:
            yield piece, False, last
        elif pos >= val_from:
            yield piece, True, last
        else:
            i = cut_point(piece, 0, val_from - pos, prefer_breaks=False)  # the nearest cut
            yield piece[:i], False, False
            yield piece[i:], True, last
        pos += len(piece)
        n_docs += last
    if n_docs != len(is_val):
        raise DataError(f"a source changed while it was being prepared: {', '.join(map(str, paths))}")


def _chunks(pieces, dtype: str) -> Iterator[tuple[list[str], list[tuple[bool, bool]], str]]:
    """Pieces grouped into chunks of about CHUNK_CHARS characters: the unit of work of a tokenizer worker."""
    texts: list[str] = []
    flags: list[tuple[bool, bool]] = []
    n_chars = 0
    for piece, is_val, ends in pieces:
        texts.append(piece)
        flags.append((is_val, ends))
        n_chars += len(piece)
        if n_chars >= CHUNK_CHARS:
            yield texts, flags, dtype
            texts, flags, n_chars = [], [], 0
    if texts:
        yield texts, flags, dtype


def _n_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def prepare(
    sources,
    out_dir: str | Path,
    tokenizer: Tokenizer,
    val_fraction: float = 0.05,
    text_field: str = "text",
    seed: int = 0,
    num_workers: int | None = None,
    max_shard_tokens: int = MAX_SHARD_TOKENS,
) -> Path:
    """Tokenize `sources` into token shards + index.json + tokenizer.json in `out_dir`; return `out_dir`.

    A seeded random `val_fraction` of the documents (at least one, when there are two or more) forms the
    validation split; a single document gives its last `val_fraction` of characters instead. Reuses an
    existing preparation of the same sources, tokenizer and split settings.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if seed < 0:
        raise DataError(f"the split seed must be >= 0, got {seed}")
    if max_shard_tokens < 1:
        raise DataError(f"max_shard_tokens must be >= 1, got {max_shard_tokens}")
    out_dir = Path(out_dir)
    paths = resolve_sources(sources)
    src_fp = _source_fingerprint(paths, text_field, val_fraction, seed)
    make_out_dir(out_dir)
    # one prepare per directory at a time: runs sharing a data cache wait here, then reuse the result
    with open(out_dir / ".lock", "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        remove_stale_tmp(out_dir)
        if _is_prepared(out_dir, src_fp, tokenizer):
            return out_dir

        # pass 1: count documents and characters (also surfaces format errors before any worker starts)
        n_docs, n_chars = 0, 0
        with tqdm(unit="doc", desc="reading documents", disable=None) as bar:
            for _, piece, last in iter_pieces(paths, text_field):
                n_chars += len(piece)
                n_docs += last
                bar.update(int(last))
        if n_docs == 0:
            raise DataError(f"no text found in: {', '.join(map(str, paths))}")
        is_val = np.zeros(n_docs, dtype=bool)
        val_from = None  # a single document: val starts at this character
        if n_docs == 1 and val_fraction > 0 and n_chars > 1:
            val_from = min(n_chars - 1, max(1, round((1 - val_fraction) * n_chars)))
        else:
            n_val = 0 if val_fraction == 0 or n_docs < 2 else min(max(1, round(val_fraction * n_docs)), n_docs - 1)
            is_val[np.random.default_rng(seed).choice(n_docs, size=n_val, replace=False)] = True

        # pass 2: tokenize in parallel into temporary shards, then move them into place
        dtype = token_dtype(tokenizer.vocab_size)
        tmp_dir = Path(tempfile.mkdtemp(dir=out_dir, prefix=f"{TMP_PREFIX}{os.getpid()}-"))
        try:
            pieces = _pieces(paths, text_field, is_val, val_from)
            shards = _tokenize_to(tmp_dir, pieces, tokenizer, n_docs, n_chars, dtype, max_shard_tokens,
                                  num_workers or min(8, _n_cpus()), desc=f"tokenizing -> {out_dir}")
            counts = ({"train": 1, "val": 1} if val_from is not None
                      else {"train": n_docs - int(is_val.sum()), "val": int(is_val.sum())})
            if val_from is None and counts["val"]:
                _warn_if_val_is_large(shards, val_fraction, counts)
            settings = {"val_fraction": val_fraction, "text_field": text_field, "seed": seed,
                        "val_split": "tail of the only document" if val_from is not None else "documents"}
            return _commit(out_dir, tmp_dir, shards, tokenizer, dtype, paths, src_fp, counts, settings)
        finally:
            _rmtree(tmp_dir)


def _warn_if_val_is_large(shards: dict, val_fraction: float, n_documents: dict) -> None:
    """The split is by whole documents: a few long ones can hold far more than val_fraction. Said, by the
    token counts the shards already have."""
    n_tokens = {s: sum(sh["n_tokens"] for sh in shards[s]) for s in SPLITS}
    share = n_tokens["val"] / max(n_tokens["train"] + n_tokens["val"], 1)
    if share > max(2 * val_fraction, val_fraction + 0.05):
        n_docs = n_documents["train"] + n_documents["val"]
        print(f"warning: the validation split holds {share:.0%} of the text ({n_tokens['val']:,} tokens, "
              f"val_fraction {val_fraction}): {n_documents['val']} of {n_docs} documents; with few documents, "
              "split them into more files or pass them as one", file=sys.stderr)


def make_out_dir(out_dir: Path) -> None:
    """Create the output directory, or say in one line why it cannot be one."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"the output {out_dir} is a file, not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the output directory {out_dir}: {e.strerror or e}") from None


_TMP_DIR = re.compile(re.escape(TMP_PREFIX) + r"(\d+)-\w+")
_TMP_FILE = re.compile(r"\.(index|tokenizer)\.json\.\w+\.tmp")  # atomic_write_text's temporaries


def remove_stale_tmp(out_dir: Path) -> list[Path]:
    """Remove what a killed prepare left in `out_dir`: its `.prepare-<pid>-*` directories whose process is
    gone (a live pid is left alone: it may be a prepare that does not share our lock, e.g. on another
    mount), and index/tokenizer temporaries (written only under the lock this caller holds)."""
    removed = []
    for p in out_dir.iterdir():
        m = _TMP_DIR.fullmatch(p.name)
        if (m and p.is_dir() and not pid_running(int(m.group(1)))) \
                or (_TMP_FILE.fullmatch(p.name) and p.is_file()):
            if p.is_dir():
                _rmtree(p)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _is_prepared(out_dir: Path, src_fp: str, tokenizer: Tokenizer) -> bool:
    old = read_index(out_dir)
    if not old or old.get("source_fingerprint") != src_fp or old.get("tokenizer_fingerprint") != tokenizer.fingerprint:
        return False
    try:  # runs read the tokenizer from here: a damaged or replaced one is written again
        if Tokenizer.load(out_dir / "tokenizer.json").fingerprint != tokenizer.fingerprint:
            return False
    except TokenizerError:
        return False
    try:
        TokenDataset(out_dir, "train"), TokenDataset(out_dir, "val")
    except DataError:
        return False  # a damaged shard: prepare again
    return True


def _tokenize_to(tmp_dir, pieces, tokenizer, n_docs, n_chars, dtype, max_shard_tokens, num_workers, desc):
    """Tokenize document pieces into `tmp_dir` shards; returns {split: [{"file", "n_tokens"}, ...]}."""
    writers = {s: _ShardWriter(tmp_dir, s, max_shard_tokens) for s in SPLITS}
    chunks = _chunks(pieces, dtype.name)
    pool = None
    try:
        with tqdm(total=n_docs, unit="doc", desc=desc, disable=None) as bar:
            if num_workers > 1 and n_chars > CHUNK_CHARS:
                # fork: workers start at once and only run `tokenizers` (no torch, no CUDA)
                ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else None)
                pool = ctx.Pool(num_workers, initializer=_init_worker, initargs=(tokenizer.to_str(),))
                results = _bounded_imap(pool, _tokenize_chunk, chunks, depth=2 * num_workers)
            else:
                results = (_tokenize_docs(tokenizer, c) for c in chunks)
            for n, train_ids, val_ids in results:
                writers["train"].write(train_ids)
                writers["val"].write(val_ids)
                bar.update(n)
    finally:
        if pool is not None:
            pool.terminate()
        shards = {s: w.close() for s, w in writers.items()}
    return shards


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _commit(out_dir, tmp_dir, shards, tokenizer, dtype, paths, src_fp, n_documents, settings) -> Path:
    """Move finished shards into place. The index goes first and comes back last: no torn dataset is valid."""
    n_tokens = {s: sum(sh["n_tokens"] for sh in shards[s]) for s in SPLITS}
    old = read_index(out_dir) or {}
    (out_dir / "index.json").unlink(missing_ok=True)
    new_files = {sh["file"] for s in SPLITS for sh in shards[s]}
    for s in SPLITS:
        for sh in old.get("splits", {}).get(s, {}).get("shards", []):
            if sh.get("file") not in new_files:
                (out_dir / sh["file"]).unlink(missing_ok=True)
    for f in new_files:
        os.replace(tmp_dir / f, out_dir / f)
    tokenizer.save(out_dir / "tokenizer.json")
    index = {
        "version": FORMAT_VERSION,
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "source_fingerprint": src_fp,
        "sources": [str(p) for p in paths],
        **settings,
        "splits": {
            s: {"n_tokens": n_tokens[s], "n_documents": n_documents[s], "shards": shards[s]}
            for s in SPLITS
        },
    }
    atomic_write_text(out_dir / "index.json", json.dumps(index, indent=1) + "\n")
    return out_dir


# --- reading ----------------------------------------------------------------------------------------------

def default_data_dir(data) -> Path:
    """A cache directory named after a run's sources and tokenizer (`data`: a DataConfig), shared by
    every run on the same data: $UNIPOOL_CACHE/data/<name>-<tokenizer>-<hash>."""
    key = json.dumps([[str(Path(s).resolve()) for s in data.sources], data.tokenizer, data.val_fraction,
                      data.text_field])
    name = Path(data.sources[0]).stem if data.sources else "shakespeare"
    tok = data.tokenizer.replace(":", "") if not Path(data.tokenizer).exists() else "tok"
    return cache_root() / "data" / f"{name}-{tok}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def prepare_run_data(data, tokenizer: Tokenizer | None = None) -> Path:
    """Tokenizer and token shards for a run's data section (`data`: a DataConfig); returns the data
    directory. `tokenizer` (a resumed run's own) is used as it is, never trained again, and data prepared
    with another tokenizer is refused. Otherwise a tokenizer already in the data directory is reused for a
    `bpe:N` spec of its size; a spec that disagrees with it is refused, naming both. With `data.prepared` the
    directory is used as it is (see `use_prepared`)."""
    if data.prepared:
        return use_prepared(Path(data.prepared), data.tokenizer, tokenizer)
    data_dir = Path(data.data_dir) if data.data_dir else default_data_dir(data)
    make_out_dir(data_dir)  # a data_dir that cannot be one is said before a tokenizer is trained
    files = data.sources or default_corpus_files()
    index = read_index(data_dir) if data.data_dir and not data.sources else None
    if index and index.get("sources") != [str(p) for p in resolve_sources(files)]:
        # Preparing the default corpus here would replace data someone prepared on purpose.
        shown = ", ".join(index.get("sources", [])[:2]) + (", ..." if len(index.get("sources", [])) > 2 else "")
        raise DataError(f"data.data_dir: {data_dir} holds data prepared from {shown or 'other sources'}; to train on "
                        f"it as it is, use --data.prepared {data_dir} (and no --data.sources)")
    cached = data_dir / "tokenizer.json"
    if tokenizer is not None:
        if (data_dir / "index.json").is_file() and not tokenizer_matches(data_dir, tokenizer):
            raise DataError(f"{data_dir} holds data prepared with another tokenizer than the resumed run's "
                            f"(fingerprint {prepared_fingerprint(data_dir)}, the run's {tokenizer.fingerprint}); "
                            "prepare the run's data elsewhere (--data.data-dir) with the run's tokenizer.json")
    elif cached.is_file():
        # a BPE trained here is reused only while the sources are the ones it was trained on
        src_fp = _source_fingerprint(resolve_sources(files), data.text_field, data.val_fraction, 0)
        tokenizer = _cached_tokenizer_for(data.tokenizer, cached, files, data.text_field,
                                          trained_on_these=(read_index(data_dir) or {}).get("source_fingerprint") == src_fp,
                                          our_cache=not data.data_dir)
    else:
        tokenizer = get_tokenizer(data.tokenizer, files, data.text_field)
    prepare(files, data_dir, tokenizer, val_fraction=data.val_fraction, text_field=data.text_field)
    return data_dir


def use_prepared(data_dir: Path, spec: str, tokenizer: Tokenizer | None = None) -> Path:
    """A directory `unipool prepare` wrote, for training as it is. Refused in one line: one that is not
    prepared, one tokenized with another tokenizer than the resumed run's (`tokenizer`), or than an explicit
    `gpt2` / tokenizer.json `spec` (a `bpe:N` spec asks to train a tokenizer: with a prepared directory the
    directory's is used)."""
    if not (data_dir / "index.json").is_file():
        raise DataError(f"data.prepared: {data_dir} is not a prepared directory (no index.json); make it with "
                        f"`unipool prepare SOURCES --out {data_dir} --tokenizer gpt2 --workers N`")
    if tokenizer is None and not spec.startswith("bpe:"):
        tokenizer = get_tokenizer(spec, [])
    if tokenizer is not None and not tokenizer_matches(data_dir, tokenizer):
        raise DataError(f"data.prepared: {data_dir} was prepared with another tokenizer (fingerprint "
                        f"{prepared_fingerprint(data_dir)}) than the run's ({tokenizer.vocab_size} tokens, fingerprint "
                        f"{tokenizer.fingerprint}); prepare the sources again with the run's tokenizer")
    return data_dir


def _cached_tokenizer_for(spec: str, cached: Path, files, text_field: str, trained_on_these: bool,
                          our_cache: bool) -> Tokenizer:
    """The tokenizer a data directory already holds, if `spec` asks for it: `bpe:N` with N its size,
    trained there on the same sources (`trained_on_these`: training again would only cost time), or the very
    same tokenizer. Otherwise a new one, which prepare writes over the old: in the cache directory unipool
    names itself (`our_cache`), and for `bpe:N` after its sources changed. A disagreeing spec in a
    directory the user named is refused."""
    try:
        have = Tokenizer.load(cached)
    except TokenizerError:
        return get_tokenizer(spec, files, text_field)  # a damaged cache file: prepare replaces it
    if spec.startswith("bpe:") and not spec[4:].isdigit():
        return get_tokenizer(spec, files, text_field)  # says what is wrong with the spec
    if spec.startswith("bpe:"):
        agrees = spec == f"bpe:{have.vocab_size}"
        if agrees and not trained_on_these:
            return get_tokenizer(spec, files, text_field)  # the sources changed: so does their BPE
        want = spec
    else:
        tokenizer = get_tokenizer(spec, files, text_field)
        agrees = tokenizer.fingerprint == have.fingerprint
        want = f"{spec} ({tokenizer.vocab_size} tokens, fingerprint {tokenizer.fingerprint})"
        if not agrees and our_cache:
            return tokenizer  # e.g. a tokenizer.json trained again in place
    if not agrees:
        raise DataError(f"--data.tokenizer {want} disagrees with the tokenizer in the data directory "
                        f"{cached} ({have.vocab_size} tokens, fingerprint {have.fingerprint}); use another "
                        f"--data.data-dir, or remove {cached.parent} to prepare it again")
    return have if spec.startswith("bpe:") else tokenizer


# --- command line: `unipool prepare` ------------------------------------------------------------------------

def add_prepare_args(parser) -> None:
    parser.add_argument("sources", nargs="*", help="text/.md, .jsonl(.zst/.gz), .parquet files, datasets "
                        "directories or folders of them (default: Shakespeare's plays)")
    parser.add_argument("--out", required=True, help="directory for the token shards, index.json and tokenizer.json")
    parser.add_argument("--tokenizer", default="bpe:8192",
                        help="gpt2 | bpe:N (byte-level BPE trained on the sources) | a tokenizer.json path")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="fraction of documents held out for val")
    parser.add_argument("--text-field", default="text", help="field holding the text in jsonl / parquet / datasets")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val document split")
    parser.add_argument("--workers", type=int, default=0, help="tokenizer processes (0: one per core, at most 8)")


def cmd_prepare(args) -> int:
    sources = args.sources or default_corpus_files()
    out = Path(args.out)
    make_out_dir(out)  # a bad --out is said now, not after training a tokenizer
    resolve_sources(sources)
    tok = get_tokenizer(args.tokenizer, sources, args.text_field)  # BPE training is deterministic: shards get reused
    prepare(sources, out, tok, val_fraction=args.val_fraction, text_field=args.text_field, seed=args.seed,
            num_workers=args.workers or None)
    train, val = TokenDataset(out, "train"), TokenDataset(out, "val")
    if train.index.get("val_split") == "tail of the only document":
        docs = f"train {train.n_tokens:,} tokens, val {val.n_tokens:,} tokens (one document: val is its end)"
    else:
        docs = (f"train {train.n_tokens:,} tokens ({train.n_documents:,} docs), val {val.n_tokens:,} tokens "
                f"({val.n_documents:,} docs)")
    print(f"{out}: {docs}, vocab {train.vocab_size}, {train.dtype.name}")
    if val.n_tokens:
        print(f"unigram baseline: {unigram_loss(train, val):.4f} nats/token on val")
    return 0
