"""Reliability of the data side: bounded memory on a huge document, text that stays text, a corpus of one
document, a prepare killed with SIGKILL, broken compressed sources, tokenizer drift, and import / export
that never overwrite without consent. Real files, real subprocesses, real kill -9."""

import gzip
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import TEXTS, make_run
from unipool import cli
from unipool.data import corpus
from unipool.data.corpus import iter_pieces, split_text
from unipool.data.dataset import TokenDataset, text_tokens
from unipool.data.prepare import prepare
from unipool.data.tokenizer import EOD_TOKEN, Tokenizer, gpt2_tokenizer, train_bpe

ROOT = Path(__file__).resolve().parent.parent
ENGLISH = " ".join(TEXTS)


@pytest.fixture(scope="module")
def gpt2() -> Tokenizer:
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("bpe") / "text.txt"
    path.write_text(ENGLISH[:300_000])
    return train_bpe([path], 400)


def all_tokens(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    return tuple(np.concatenate([np.asarray(s) for s in TokenDataset(data_dir, split).shards] or [np.zeros(0)])
                 for split in ("train", "val"))


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# ---- memory ------------------------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import json, resource, sys
    from unipool.data.prepare import prepare
    from unipool.data.tokenizer import gpt2_tokenizer
    tok = gpt2_tokenizer()
    tok.encode_text(["warm up"])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    prepare([sys.argv[1]], sys.argv[2], tok, num_workers=1)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"growth_mb": (after - before) / 1024}))
""")


def test_memory_does_not_grow_with_the_size_of_a_document(tmp_path):
    """A 3 MB one-line .txt (one document): prepare, in a child process, grows its peak RSS by far less than
    the ~175 bytes of RAM per byte of text of tokenizing it whole (measured before pieces: +457 MB, now +50 MB)."""
    line = ENGLISH.replace("\n", " ")
    src = tmp_path / "one_line.txt"
    src.write_text((line * (3_000_000 // len(line) + 1))[:3_000_000])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run([sys.executable, "-c", CHILD, str(src), str(tmp_path / "out")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    growth = json.loads(res.stdout.strip().splitlines()[-1])["growth_mb"]
    assert growth < 200, f"prepare of a 3 MB document grew the peak RSS by {growth:.0f} MB"
    train, val = TokenDataset(tmp_path / "out", "train"), TokenDataset(tmp_path / "out", "val")
    assert train.n_tokens > 500_000 and val.n_tokens > 20_000  # one document, its tail is val


def test_pieces_tokenize_exactly_like_the_whole_text(gpt2, bpe):
    """The cut rule: pieces, tokenized apart and put end to end, give the whole text's tokens whenever
    there was whitespace to cut before; only a hard cut (no such place in the window) may differ."""
    alphabet = [*"ab cd\n\n\t\r'sxyz12 3.,!?", "\u00a0", "\u3000", "\x1c", "\x85", "é", "😀", "'ll", "  ",
                EOD_TOKEN, "\u2028", "\x0b"]
    rng = random.Random(0)
    exact = 0
    for _ in range(400):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 150))).strip()
        if not text:
            continue
        pieces = [p for p, _ in split_text(text, rng.randint(4, 40))]
        assert "".join(pieces) == text and all(pieces)
        ends = np.cumsum([len(p) for p in pieces])[:-1]
        if not all(text[i].isspace() and not text[i - 1].isspace() for i in ends):
            continue  # a hard cut: a window without whitespace after a non-whitespace character
        for tok in (gpt2, bpe):
            assert sum(tok.encode_text(pieces), []) == tok.encode_text([text])[0], (text, pieces)
        exact += len(pieces) > 1
    assert exact > 100


def test_streamed_text_file_gives_the_stripped_documents(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "READ_CHARS", 13)  # documents and pieces straddle many read blocks
    docs = ["  \n one two  three\n\nfour ", "", "\n\n", "x" * 50, "a\n" + " " * 30 + "b c  ", "last one   \n"]
    src = tmp_path / "d.txt"
    src.write_text("\f".join(docs))
    got, parts = [], []
    for _, piece, last in iter_pieces([src], max_chars=7):
        assert len(piece) <= 7
        parts.append(piece)
        if last:
            got.append("".join(parts))
            parts = []
    assert got == [d.strip() for d in docs if d.strip()]


# ---- text stays text; one document ----------------------------------------------------------------------

def test_endoftext_literal_in_text_stays_text(tmp_path, gpt2, bpe):
    docs = [f"Tokens such as {EOD_TOKEN} are text here.", f"{EOD_TOKEN}", f"The end{EOD_TOKEN}of it all."]
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    for tok in (gpt2, bpe):
        out = prepare([src], tmp_path / f"p{tok.vocab_size}", tok, val_fraction=0.0)
        train, _ = all_tokens(out)
        assert int((train == tok.eos_id).sum()) == len(docs)  # only the inserted separators
        assert tok.decode(train) == "".join(d + EOD_TOKEN for d in docs)
        assert text_tokens(src, tok) == train.tolist()  # eval on raw text reads it the same way


def test_single_document_corpus_splits_its_tail_for_validation(tmp_path, bpe):
    text = "\n\n".join(TEXTS[:40])
    src = tmp_path / "one.txt"
    src.write_text(text)
    out = prepare([src], tmp_path / "p", bpe, val_fraction=0.1)
    train, val = all_tokens(out)
    index = json.loads((out / "index.json").read_text())
    assert index["val_split"] == "tail of the only document"
    assert 0.08 < len(val) / (len(train) + len(val)) < 0.12
    whole = bpe.encode_text([text.strip()])[0] + [bpe.eos_id]
    assert train.tolist() + val.tolist() == whole  # cut where tokens do not change; EOD once, at the end
    assert not (train == bpe.eos_id).any()


def test_single_document_corpus_trains_and_evaluates(tmp_path, capsys):
    src = tmp_path / "one.txt"
    src.write_text("\n".join(TEXTS[:30]))
    rc = cli.main(["train", "--preset", "debug", "--data.sources", str(src), "--data.tokenizer", "bpe:300",
                   "--data.data-dir", str(tmp_path / "data"), "--train.out-dir", str(tmp_path), "--train.run-name",
                   "r", "--train.progress", "false", "--set", "train.batch_size=2", "--set", "train.seq_len=32",
                   "--train.steps", "2", "--train.sample-tokens", "2", "--train.eval-tokens", "64"])
    assert rc == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["val_loss"] > 0


# ---- kill -9, broken inputs -------------------------------------------------------------------------------

def test_temporaries_of_a_killed_prepare_are_removed_by_the_next(tmp_path, bpe):
    src = tmp_path / "big.txt"
    src.write_text((ENGLISH * 3)[:400_000])
    bpe.save(tmp_path / "tok.json")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # The child SIGKILLs itself right after its first shard write has reached the file: a kill -9 in the middle of
    # prepare at a fixed point, however fast the machine (polling from outside raced a quick prepare to its end).
    child = ("import os, signal, sys\n"
             "from unipool.data import prepare as dataset\n"
             "from unipool.data.tokenizer import Tokenizer\n"
             "write = dataset._ShardWriter.write\n"
             "def write_then_die(self, arr):\n"
             "    write(self, arr)\n"
             "    if arr.size:\n"
             "        self.f.flush()\n"
             "        os.kill(os.getpid(), signal.SIGKILL)\n"
             "dataset._ShardWriter.write = write_then_die\n"
             "dataset.prepare([sys.argv[1]], sys.argv[2], Tokenizer.load(sys.argv[3]), num_workers=1)\n")
    proc = subprocess.run([sys.executable, "-c", child, str(src), str(out), str(tmp_path / "tok.json")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    tmps = list(out.glob(".prepare-*-*"))
    assert len(tmps) == 1 and any(f.stat().st_size for f in tmps[0].iterdir()), "the killed prepare wrote no shard"
    assert [p.name for p in out.iterdir() if p.name.startswith(".prepare-")] == [tmps[0].name]

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = out / f".prepare-{sleeper.pid}-inuse"  # a live process's: not ours to remove
        other = out / ".prepare-notes"  # not our naming pattern
        live.mkdir()
        other.mkdir()
        small = tmp_path / "small.txt"
        small.write_text("\f".join(TEXTS[:5]))
        prepare([small], out, bpe)
        left = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
        assert left == sorted([".lock", live.name, other.name])
    finally:
        sleeper.kill()
        sleeper.wait()


def test_broken_sources_and_outputs_are_one_line_errors(tmp_path, bpe, capsys):
    bpe.save(tmp_path / "tok.json")
    good = tmp_path / "good.jsonl.gz"
    with gzip.open(good, "wt") as f:
        for i in range(3000):
            f.write(json.dumps({"text": f"document {i}: " + TEXTS[i % len(TEXTS)][:200]}) + "\n")
    data = good.read_bytes()
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    (tmp_path / "bad.jsonl.gz").write_bytes(data[:10] + bytes(range(256)) * 8)
    (tmp_path / "empty.txt").write_text(" \n\f\n ")
    (tmp_path / "file").write_text("not a directory")
    cases = [
        ("cut.jsonl.gz", "out1", "truncated file"),
        ("bad.jsonl.gz", "out2", "corrupt compressed file"),
        ("empty.txt", "out3", "no text found"),
        ("good.jsonl.gz", "file", "is a file, not a directory"),
        ("good.jsonl.gz", "file/sub", "cannot create the output directory"),
    ]
    try:
        import zstandard

        raw = "".join(json.dumps({"text": f"zstd document {i}"}) + "\n" for i in range(20000)).encode()
        frame = zstandard.ZstdCompressor().compress(raw)
        (tmp_path / "cut.jsonl.zst").write_bytes(frame[: len(frame) // 2])
        (tmp_path / "two.jsonl.zst").write_bytes(frame + frame)  # two frames: read whole
        cases.append(("cut.jsonl.zst", "out4", "truncated file"))
    except ImportError:
        zstandard = None
    for src, out, message in cases:
        for tokenizer in (str(tmp_path / "tok.json"), "bpe:300"):  # prepare, and tokenizer training
            rc = cli.main(["prepare", str(tmp_path / src), "--out", str(tmp_path / out), "--tokenizer", tokenizer])
            assert rc == 2 and message in one_line_error(capsys), (src, out)
    if zstandard is not None:
        prepare([tmp_path / "two.jsonl.zst"], tmp_path / "two", bpe, val_fraction=0.0)
        assert TokenDataset(tmp_path / "two", "train").n_documents == 40000


# ---- tokenizer drift ----------------------------------------------------------------------------------------

def test_eval_refuses_data_prepared_with_another_tokenizer(tmp_path, bpe, capsys):
    run, _ = make_run(tmp_path / "run")
    src = tmp_path / "text.txt"
    src.write_text("\f".join(TEXTS[:20]))
    prepare([src], tmp_path / "same", Tokenizer.load(run / "tokenizer.json"))
    prepare([src], tmp_path / "other", bpe)  # 400 tokens: fits the model's vocabulary, means other text
    assert cli.main(["eval", str(run), "--data", str(tmp_path / "same"), "--max-tokens", "64"]) == 0
    capsys.readouterr()
    assert cli.main(["eval", str(run), "--data", str(tmp_path / "other"), "--max-tokens", "64"]) == 2
    err = one_line_error(capsys)
    assert "another tokenizer" in err and str(run / "tokenizer.json") in err


def train_args(src, data_dir, out, name, tokenizer="bpe:320", *extra):
    return ["train", "--preset", "debug", "--data.sources", str(src), "--data.tokenizer", tokenizer,
            "--data.data-dir", str(data_dir), "--train.out-dir", str(out), "--train.run-name", name,
            "--train.progress", "false", "--set", "train.batch_size=2", "--set", "train.seq_len=32",
            "--train.sample-tokens", "2", "--train.eval-tokens", "64", *extra]


def test_resume_never_retrains_the_tokenizer_and_refuses_other_data(tmp_path, bpe, capsys):
    src = tmp_path / "text.txt"
    src.write_text("\f".join(TEXTS[:40]))
    data = tmp_path / "data"
    assert cli.main(train_args(src, data, tmp_path, "r", "bpe:320", "--train.steps", "2")) == 0
    run = tmp_path / "r"
    tokenizer_json = (run / "tokenizer.json").read_bytes()

    # the data cache is gone and the text changed: the run's own tokenizer tokenizes it, nothing is retrained
    for f in data.iterdir():
        f.unlink()
    src.write_text("\f".join(TEXTS[40:90]))
    assert cli.main(["train", "--resume", str(run), "--train.steps", "3", "--train.progress", "false"]) == 0
    assert (run / "tokenizer.json").read_bytes() == tokenizer_json
    assert Tokenizer.load(data / "tokenizer.json").fingerprint == Tokenizer.load(run / "tokenizer.json").fingerprint

    # the data directory now holds another tokenizer's data: refused, and the run is untouched
    prepare([src], data, bpe)
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(run), "--train.steps", "4", "--train.progress", "false"]) == 2
    assert "another tokenizer than the resumed run's" in one_line_error(capsys)
    assert (run / "tokenizer.json").read_bytes() == tokenizer_json
    assert (run / "checkpoints" / "LATEST").read_text().strip() == "step_000003"

    # an explicit spec that disagrees with the tokenizer cached in the data directory: refused, naming both
    for spec, named in (("bpe:300", "bpe:300"), ("gpt2", "gpt2")):
        assert cli.main(train_args(src, data, tmp_path, f"x{spec[:3]}", spec, "--train.steps", "1")) == 2
        err = one_line_error(capsys)
        assert named in err and str(data / "tokenizer.json") in err and "400 tokens" in err
    assert not (tmp_path / "xbpe").exists() and not (tmp_path / "xgpt").exists()


# ---- nothing overwritten without consent ----------------------------------------------------------------

def test_export_and_import_refuse_to_overwrite(tmp_path, capsys):
    run, _ = make_run(tmp_path / "run")
    snapshot = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}

    def run_untouched():
        assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == snapshot

    for target in (run, run / "checkpoints", run / "checkpoints" / "step_000010"):
        for force in ([], ["--force"]):
            assert cli.main(["export", str(run), "--hf", str(target), *force]) == 2
            assert "is a unipool" in one_line_error(capsys)
    run_untouched()

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert cli.main(["export", str(run), "--hf", str(busy)]) == 2
    assert "not empty; pass --force" in one_line_error(capsys)
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    assert cli.main(["export", str(run), "--hf", str(busy), "--force"]) == 0
    assert (busy / "model.safetensors").is_file() and (busy / "notes.txt").read_text() == "mine"
    capsys.readouterr()
    assert cli.main(["export", str(run), "--hf", str(busy)]) == 2  # an export is not empty either
    one_line_error(capsys)
    assert cli.main(["export", str(run), "--hf", str(busy), "--force"]) == 0  # but may be replaced
    assert cli.main(["export", str(run), "--hf", str(tmp_path / "busy" / "notes.txt")]) == 2
    capsys.readouterr()

    for force in ([], ["--force"]):  # importing over a run: never
        assert cli.main(["import", str(busy), "--out", str(run), *force]) == 2
        assert "is a unipool run" in one_line_error(capsys)
    run_untouched()
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("keep")
    assert cli.main(["import", str(busy), "--out", str(other)]) == 2
    assert "not empty; pass --force" in one_line_error(capsys)
    assert cli.main(["import", str(busy), "--out", str(other), "--force"]) == 0
    again = tmp_path / "again"  # a transformers directory (its own config.json) replaced with --force
    again.mkdir()
    (again / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    assert cli.main(["import", str(busy), "--out", str(again), "--force"]) == 0
    assert "model_type" not in json.loads((again / "config.json").read_text())
    assert cli.main(["eval", str(other), "--data", str(tmp_path / "busy" / "notes.txt"), "--seq-len", "8"]) == 0


def test_default_corpus_conversion_removes_what_a_killed_one_left(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale, live = tmp_path / f".shakespeare-{dead.pid}-abc", tmp_path / f".shakespeare-{os.getpid()}-abc"
    stale.mkdir()
    live.mkdir()
    assert corpus.default_corpus_files(tmp_path)
    assert not stale.exists() and live.exists()
