import gzip
import json
import math
import os
import time
from collections import Counter

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pydoc_data.topics

import numpy as np
import pytest
import torch

from unipool.data import dataset as data_mod
from unipool.data import prepare as prepare_mod
from unipool.data.corpus import DataError, default_corpus_files, markdown_to_scenes
from unipool.data.dataset import TokenDataset, WindowSampler, eval_batches, unigram_loss
from unipool.data.prepare import prepare, token_dtype
from unipool.data.tokenizer import EOD_TOKEN, Tokenizer, gpt2_tokenizer, train_bpe
from unipool.errors import UnipoolError

# real English documents, all distinct, with surrounding whitespace removed (as plain-text sources do)
DOCS = sorted({t.strip() for t in pydoc_data.topics.topics.values() if t.strip()})


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "train.txt"
    path.write_text("\f".join(DOCS), encoding="utf-8")
    return train_bpe([path], 1024)


def all_tokens(ds: TokenDataset) -> np.ndarray:
    return ds.read(0, ds.n_tokens) if ds.n_tokens else np.zeros(0, ds.dtype)


def decoded_docs(ds: TokenDataset, tokenizer: Tokenizer) -> list[str]:
    text = tokenizer.decode(all_tokens(ds).tolist())
    assert text.endswith(EOD_TOKEN)  # EOD after every document, the last one included
    return text[: -len(EOD_TOKEN)].split(EOD_TOKEN)


# --- sources ----------------------------------------------------------------------------------------------

def write_source(kind: str, root, docs: list[str]):
    if kind == "txt":
        (root / "a.txt").write_text("\n\f\n".join(docs), encoding="utf-8")
        return root / "a.txt"
    if kind == "md":
        (root / "a.md").write_text("\f".join(docs) + "\n", encoding="utf-8")
        return root / "a.md"
    lines = "".join(json.dumps({"meta": {"i": i}, "text": d}) + "\n" for i, d in enumerate(docs))
    if kind == "jsonl":
        (root / "a.jsonl").write_text(lines + "\n", encoding="utf-8")  # a blank line is skipped
        return root / "a.jsonl"
    if kind == "jsonl.zst":
        import zstandard

        (root / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
        return root / "a.jsonl.zst"
    if kind == "jsonl.gz":
        (root / "a.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
        return root / "a.jsonl.gz"
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), root / "a.parquet", row_group_size=7)
        return root / "a.parquet"
    if kind == "hf":
        import datasets

        ds = datasets.Dataset.from_dict({"text": docs})
        datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(root / "hf"))
        return root / "hf"
    if kind == "dir":  # a directory of mixed files, read in sorted order; unknown files are ignored
        d = root / "dir"
        (d / "sub").mkdir(parents=True)
        (d / "0.txt").write_text(docs[0])
        (d / "notes.csv").write_text("ignored,file\n")
        (d / "sub" / "1.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[1:]))
        return d
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["txt", "md", "jsonl", "jsonl.zst", "jsonl.gz", "parquet", "hf", "dir"])
def test_round_trip_each_format(tmp_path, tok, kind):
    docs = DOCS[:25]
    src = write_source(kind, tmp_path, docs)
    out = prepare([src], tmp_path / "prepared", tok, val_fraction=0.0, num_workers=1)
    ds = TokenDataset(out, "train")
    assert decoded_docs(ds, tok) == docs
    assert ds.n_documents == len(docs) and ds.vocab_size == tok.vocab_size
    assert TokenDataset(out, "val").n_tokens == 0
    assert Tokenizer.load(ds.tokenizer_path).fingerprint == tok.fingerprint


def test_parallel_prepare_many_shards_matches_serial(tmp_path, tok, monkeypatch):
    src = write_source("txt", tmp_path, DOCS)
    monkeypatch.setattr(prepare_mod, "CHUNK_CHARS", 20_000)  # many chunks through the worker pool
    serial = TokenDataset(prepare(src, tmp_path / "serial", tok, num_workers=1), "train")
    sharded = TokenDataset(prepare(src, tmp_path / "par", tok, num_workers=2, max_shard_tokens=5000), "train")
    assert len(sharded.shards) > 10 and all(len(s) <= 5000 for s in sharded.shards)
    np.testing.assert_array_equal(all_tokens(sharded), all_tokens(serial))
    # reads crossing shard boundaries
    for start in (4990, 5000, 14_999, sharded.n_tokens - 20):
        np.testing.assert_array_equal(sharded.read(start, 20), all_tokens(serial)[start: start + 20])
    assert tok.decode(all_tokens(serial)[:200].tolist()) in "\f".join(DOCS)


def test_dtype_by_vocab_size(tmp_path):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    big = gpt2_tokenizer()
    big.tok.add_tokens([f"<extra_{i}>" for i in range(16_000)])
    big = Tokenizer(big.tok)
    assert big.vocab_size > 65536
    src = tmp_path / "a.txt"
    src.write_text(DOCS[0] + " <extra_15999>")
    ds = TokenDataset(prepare(src, tmp_path / "out", big, val_fraction=0), "train")
    assert ds.dtype == np.uint32 and ds.shards[0].dtype == np.uint32
    assert all_tokens(ds)[-2] == big.tok.token_to_id("<extra_15999>") > 65536


# --- train / validation split --------------------------------------------------------------------------------

def test_no_train_val_overlap(tmp_path, tok):
    docs = DOCS[:50]
    src = write_source("txt", tmp_path, docs)
    out = prepare(src, tmp_path / "p", tok, val_fraction=0.2, seed=3, num_workers=2)
    train, val = TokenDataset(out, "train"), TokenDataset(out, "val")
    train_docs, val_docs = decoded_docs(train, tok), decoded_docs(val, tok)
    assert len(val_docs) == round(0.2 * len(docs)) == val.n_documents
    assert Counter(train_docs + val_docs) == Counter(docs)  # a partition of the documents
    assert not set(train_docs) & set(val_docs)
    # no validation document's token sequence appears anywhere in the training stream
    train_str = "," + ",".join(map(str, all_tokens(train).tolist())) + ","
    for d in val_docs:
        assert "," + ",".join(map(str, tok.encode(d))) + "," not in train_str
    # the split is a function of the seed
    same = decoded_docs(TokenDataset(prepare(src, tmp_path / "q", tok, val_fraction=0.2, seed=3), "val"), tok)
    other = decoded_docs(TokenDataset(prepare(src, tmp_path / "r", tok, val_fraction=0.2, seed=4), "val"), tok)
    assert same == val_docs and other != val_docs


def test_tiny_corpus_still_gets_a_val_document(tmp_path, tok):
    src = write_source("txt", tmp_path, DOCS[:3])
    out = prepare(src, tmp_path / "p", tok, val_fraction=0.05)
    assert TokenDataset(out, "val").n_documents == 1 and TokenDataset(out, "train").n_documents == 2


# --- reuse and atomic writes ------------------------------------------------------------------------------------

def test_prepare_reuses_and_redoes(tmp_path, tok):
    src = write_source("jsonl", tmp_path, DOCS[:10])
    out = prepare(src, tmp_path / "p", tok)
    index = (out / "index.json").read_text()
    stamp = (out / "train_000.bin").stat().st_mtime_ns
    assert prepare(src, out, tok) == out
    assert (out / "train_000.bin").stat().st_mtime_ns == stamp and (out / "index.json").read_text() == index
    time.sleep(0.01)
    write_source("jsonl", tmp_path, DOCS[10:20])  # the source changed: prepared again
    prepare(src, out, tok)
    assert decoded_docs(TokenDataset(out, "train"), tok)[0] in DOCS[10:20]
    other_tok = train_bpe([src], 300)  # another tokenizer: prepared again
    prepare(src, out, other_tok)
    assert TokenDataset(out, "train").vocab_size == 300
    assert sorted(p.name for p in out.iterdir()) == [".lock", "index.json", "tokenizer.json", "train_000.bin",
                                                     "val_000.bin"]


def test_interrupted_prepare_leaves_previous_dataset(tmp_path, tok, monkeypatch):
    src = write_source("txt", tmp_path, DOCS[:10])
    out = prepare(src, tmp_path / "p", tok)
    before = all_tokens(TokenDataset(out, "train"))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_mod, "_commit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(src, out, tok, seed=1)
    np.testing.assert_array_equal(all_tokens(TokenDataset(out, "train")), before)
    assert not [p for p in out.iterdir() if p.name.startswith(".prepare")]  # temporary shards removed


# --- errors --------------------------------------------------------------------------------------------------

def test_corrupt_shard(tmp_path, tok):
    out = prepare(write_source("txt", tmp_path, DOCS[:10]), tmp_path / "p", tok)
    shard = out / "train_000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match="corrupt shard .*train_000.bin"):
        TokenDataset(out, "train")
    shard.unlink()
    with pytest.raises(DataError, match="corrupt shard .*no file"):
        TokenDataset(out, "train")
    (out / "index.json").unlink()
    with pytest.raises(DataError, match="not a prepared dataset"):
        TokenDataset(out, "val")


def test_source_errors(tmp_path, tok):
    (tmp_path / "data.csv").write_text("a,b\n")
    (tmp_path / "blank.txt").write_text("  \n\f\n\n")
    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    (tmp_path / "nofield.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "emptydir").mkdir()
    cases = {
        "missing.txt": "no such file or directory: .*missing.txt",
        "data.csv": "unsupported data format: .*data.csv",
        "blank.txt": "no text found in: .*blank.txt",
        "empty.jsonl": "no text found in: .*empty.jsonl",
        "nofield.jsonl": "line 1 of .*nofield.jsonl has no string field 'text'",
        "bad.jsonl": "bad JSON on line 2 of .*bad.jsonl",
        "latin1.txt": "not UTF-8 text: .*latin1.txt",
        "emptydir": "no data files .* in directory: .*emptydir",
    }
    for name, message in cases.items():
        with pytest.raises(DataError, match=message) as e:
            prepare([tmp_path / name], tmp_path / "out", tok)
        assert isinstance(e.value, UnipoolError) and "\n" not in str(e.value)
    assert not (tmp_path / "out" / "index.json").exists()


def test_parquet_and_dataset_missing_column(tmp_path, tok):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "a.parquet")
    datasets.Dataset.from_dict({"body": ["x"]}).save_to_disk(str(tmp_path / "hf"))
    for name in ("a.parquet", "hf"):
        with pytest.raises(DataError, match="no column 'text'"):
            prepare(tmp_path / name, tmp_path / "out", tok)
    out = prepare(tmp_path / "a.parquet", tmp_path / "out", tok, text_field="body", val_fraction=0)
    assert decoded_docs(TokenDataset(out, "train"), tok) == ["x"]


# --- sampling -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("prepared")
    src = write_source("txt", root, DOCS)
    return prepare(src, root / "p", tok, max_shard_tokens=20_000)


def test_windows_are_shifted_slices_of_the_data(prepared):
    ds = TokenDataset(prepared, "train")
    sampler = WindowSampler(ds, batch_size=4, seq_len=32, seed=0)
    starts = sampler.window_starts(0)
    x, y = sampler.next_batch()
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.long
    flat = all_tokens(ds).astype(np.int64)
    for i, s in enumerate(starts):
        assert x[i].tolist() == flat[s: s + 32].tolist() and y[i].tolist() == flat[s + 1: s + 33].tolist()
    assert len(set(starts.tolist())) == 4 and len(ds.shards) > 1


def test_sampler_deterministic_and_resumes_exactly(prepared):
    ds = TokenDataset(prepared, "train")
    n = 8
    a = WindowSampler(ds, 3, 16, seed=7)
    straight = [a.next_batch() for _ in range(n)]
    b = WindowSampler(ds, 3, 16, seed=7)
    resumed = [b.next_batch() for _ in range(n // 2)]
    state = json.loads(json.dumps(b.state_dict()))  # survives a JSON round trip (checkpoint meta)
    c = WindowSampler(ds, 3, 16, seed=0)
    c.load_state_dict(state)
    resumed += [c.next_batch() for _ in range(n - n // 2)]
    for (x1, y1), (x2, y2) in zip(straight, resumed):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    other = WindowSampler(ds, 3, 16, seed=8).next_batch()
    assert not torch.equal(other[0], straight[0][0])
    assert not torch.equal(straight[0][0], straight[1][0])  # a new batch every step


def test_rank_striding_rule(prepared):
    ds = TokenDataset(prepared, "train")
    world, b = 3, 2
    single = WindowSampler(ds, world * b, 16, seed=5)
    ranks = [WindowSampler(ds, b, 16, seed=5, rank=r, world_size=world) for r in range(world)]
    for _ in range(4):
        x, y = single.next_batch()
        parts = [s.next_batch() for s in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
    with pytest.raises(DataError, match="outside world_size"):
        WindowSampler(ds, 2, 16, rank=3, world_size=3)
    with pytest.raises(DataError, match="seed must be >= 0"):
        WindowSampler(ds, 2, 16, seed=-1)


def test_sampler_rejects_too_short_split(prepared):
    val = TokenDataset(prepared, "val")
    with pytest.raises(DataError, match="fewer than seq_len"):
        WindowSampler(val, 2, val.n_tokens)


def test_eval_batches_cover_split_once(prepared):
    val = TokenDataset(prepared, "val")
    flat = torch.from_numpy(all_tokens(val).astype(np.int64))
    seq_len = 50
    batches = list(eval_batches(val, 4, seq_len))
    assert all(x.shape == y.shape for x, y in batches)
    assert torch.equal(torch.cat([y.flatten() for _, y in batches]), flat[1:])
    assert torch.equal(torch.cat([x.flatten() for x, _ in batches]), flat[:-1])
    assert batches[-1][0].shape == (1, (val.n_tokens - 1) % seq_len)
    assert all(x.shape[1] == seq_len for x, _ in batches[:-1])
    # again identical; capped runs take the first max_tokens targets (whole windows, then the rest), the
    # same rule as raw text in `unipool eval` (one windowing for both)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, eval_batches(val, 4, seq_len)))
    capped = list(eval_batches(val, 4, seq_len, max_tokens=520))
    assert sum(y.numel() for _, y in capped) == 520 and torch.equal(capped[0][1], batches[0][1])
    assert torch.equal(torch.cat([y.flatten() for _, y in capped]), flat[1:521])
    # ranks split the batches between them
    per_rank = [list(eval_batches(val, 4, seq_len, rank=r, world_size=2)) for r in range(2)]
    assert sum(len(p) for p in per_rank) == len(batches)
    assert torch.equal(per_rank[1][0][0], batches[1][0])


# --- unigram baseline ------------------------------------------------------------------------------------------

def write_prepared(root, vocab_size: int, train: list[int], val: list[int]):
    """A prepared directory written by hand, to test readers against known token counts."""
    root.mkdir()
    splits = {}
    for name, ids in (("train", train), ("val", val)):
        np.array(ids, dtype=np.uint16).tofile(root / f"{name}_000.bin")
        splits[name] = {"n_tokens": len(ids), "n_documents": 1, "shards": [{"file": f"{name}_000.bin",
                                                                              "n_tokens": len(ids)}]}
    index = {"version": data_mod.FORMAT_VERSION, "dtype": "uint16", "vocab_size": vocab_size, "eos_id": 0,
             "splits": splits}
    (root / "index.json").write_text(json.dumps(index))
    return root


def test_unigram_loss_hand_computed(tmp_path):
    d = write_prepared(tmp_path / "d", vocab_size=4, train=[0, 1, 1, 2], val=[1, 3])
    # add-one counts over 4 ids: [2, 3, 2, 1] / 8
    expected = -(math.log(3 / 8) + math.log(1 / 8)) / 2
    assert unigram_loss(TokenDataset(d, "train"), TokenDataset(d, "val")) == pytest.approx(expected, rel=1e-12)


def test_unigram_loss_matches_slow_reference(prepared):
    train, val = TokenDataset(prepared, "train"), TokenDataset(prepared, "val")
    counts = Counter(all_tokens(train).tolist())
    total = train.n_tokens + train.vocab_size
    expected = -sum(math.log((counts[t] + 1) / total) for t in all_tokens(val).tolist()) / val.n_tokens
    got = unigram_loss(train, val)
    assert got == pytest.approx(expected, rel=1e-9)
    assert 3.0 < got < math.log(train.vocab_size)  # English text: well below the uniform distribution


# --- default corpus ---------------------------------------------------------------------------------------------

def test_markdown_to_scenes():
    md = (
        "# The Play\n\n## ACT I\n\n### SCENE I. A street.\n\n_Enter A, with_  \n_B_\n\n**A**  \n"
        "Good \\--morrow,  \nfriend.\n\n*Exit.*\n\n### SCENE II. A room.\n\n**B**  \nAy, _[Aside]_ no.\n"
    )
    assert markdown_to_scenes(md) == [
        "The Play\n\nACT I\n\nSCENE I. A street.\n\nEnter A, with\nB\n\nA\nGood --morrow,\nfriend.\n\nExit.",
        "SCENE II. A room.\n\nB\nAy, [Aside] no.",
    ]


def test_default_corpus(tmp_path):
    files = default_corpus_files(tmp_path)
    assert len(files) == 38 and all(f.suffix == ".txt" for f in files)
    text = "".join(f.read_text(encoding="utf-8") for f in files)
    assert len(text.encode()) > 4_000_000
    assert "To be, or not to be" in text and "HAMLET\n" in text
    assert not any(marker in text for marker in ("#", "**", "_", "  \n"))
    scenes = text.split("\f")
    assert len(scenes) > 700
    assert sum(s.strip().startswith(("SCENE", "ACT")) for s in scenes) > 700  # scenes are the documents
    # cached: the second call reuses the converted files
    stamp = files[0].stat().st_mtime_ns
    assert default_corpus_files(tmp_path) == files and files[0].stat().st_mtime_ns == stamp


def test_concurrent_prepares_share_one_result(tmp_path, tok):
    import threading

    src = write_source("txt", tmp_path, DOCS[:20])
    results, errors = [], []

    def run():
        try:
            results.append(all_tokens(TokenDataset(prepare(src, tmp_path / "p", tok, num_workers=1), "train")))
        except Exception as e:  # noqa: BLE001 -- reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 3
    assert all(np.array_equal(r, results[0]) for r in results)


def test_prepare_command(tmp_path, tok, capsys):
    import argparse

    from unipool.data.prepare import add_prepare_args, cmd_prepare

    parser = argparse.ArgumentParser()
    add_prepare_args(parser)
    src = write_source("jsonl", tmp_path, DOCS[:20])
    tok.save(tmp_path / "tok.json")
    args = parser.parse_args([str(src), "--out", str(tmp_path / "p"), "--tokenizer", str(tmp_path / "tok.json"),
                              "--val-fraction", "0.1"])
    assert cmd_prepare(args) == 0
    out = capsys.readouterr().out
    train, val = TokenDataset(tmp_path / "p", "train"), TokenDataset(tmp_path / "p", "val")
    assert f"train {train.n_tokens:,} tokens (18 docs), val {val.n_tokens:,} tokens (2 docs)" in out
    assert f"unigram baseline: {unigram_loss(train, val):.4f}" in out


def test_malformed_index(tmp_path):
    d = write_prepared(tmp_path / "d", vocab_size=4, train=[0, 1], val=[1])
    index = json.loads((d / "index.json").read_text())
    del index["splits"]["val"]
    (d / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match="malformed index.json"):
        TokenDataset(d, "val")
    assert TokenDataset(d, "train").n_tokens == 2


def test_text_documents_split_across_read_blocks(tmp_path):
    from unipool.data.corpus import iter_documents

    block = 1 << 22  # the reader's block size: separators land on and around block boundaries
    docs = ["x" * (block - 1), "y", "z" * block, "w " * 999 + "w"]
    (tmp_path / "big.txt").write_text("\f".join(docs) + "\f\n\f", encoding="utf-8")
    assert [d for _, d in iter_documents([tmp_path / "big.txt"])] == docs


# --- tokenizer and data directory cache -------------------------------------------------------------------

def test_bpe_is_trained_on_the_named_text_field(tmp_path):
    from unipool.config import DataConfig
    from unipool.data.prepare import prepare_run_data

    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"id": i, "content": d}) + "\n" for i, d in enumerate(DOCS[:30])))
    data = DataConfig(sources=[str(src)], tokenizer="bpe:300", text_field="content", data_dir=str(tmp_path / "d"))
    out = prepare_run_data(data)
    tokenizer = TokenDataset(out, "train").tokenizer()
    assert tokenizer.fingerprint == train_bpe([src], 300, "content").fingerprint
    assert set(decoded_docs(TokenDataset(out, "train"), tokenizer)) <= set(DOCS[:30])


def test_a_cached_bpe_is_trained_again_when_its_sources_change(tmp_path):
    from unipool.config import DataConfig
    from unipool.data.prepare import prepare_run_data

    src = tmp_path / "c.txt"
    src.write_text("\f".join(DOCS[:40]))
    data = DataConfig(sources=[str(src)], tokenizer="bpe:300", data_dir=str(tmp_path / "d"))
    out = prepare_run_data(data)
    first = TokenDataset(out, "train").tokenizer().fingerprint
    assert prepare_run_data(data) == out and TokenDataset(out, "train").tokenizer().fingerprint == first
    time.sleep(0.01)
    src.write_text("\f".join(DOCS[40:80]))  # edited in place: the same path, other text
    prepare_run_data(data)
    now = TokenDataset(out, "train").tokenizer()
    assert now.fingerprint != first and now.fingerprint == train_bpe([src], 300).fingerprint
    assert set(decoded_docs(TokenDataset(out, "train"), now)) <= set(DOCS[40:80])


def test_a_damaged_tokenizer_in_a_prepared_directory_is_written_again(tmp_path, tok):
    src = write_source("txt", tmp_path, DOCS[:10])
    out = prepare(src, tmp_path / "p", tok)
    for damage in ('{"truncated', None):  # cut short, then gone
        if damage is None:
            (out / "tokenizer.json").unlink()
        else:
            (out / "tokenizer.json").write_text(damage)
        prepare(src, out, tok)
        assert TokenDataset(out, "train").tokenizer().fingerprint == tok.fingerprint


def test_a_split_of_few_long_documents_says_how_large_val_is(tmp_path, tok, capsys):
    long = max(DOCS, key=len)
    (tmp_path / "a.txt").write_text("\f".join([long, long]))  # two documents of the same tokens: val is half
    prepare(tmp_path / "a.txt", tmp_path / "p", tok, val_fraction=0.05)
    val, train = TokenDataset(tmp_path / "p", "val"), TokenDataset(tmp_path / "p", "train")
    assert (val.n_documents, train.n_documents) == (1, 1)
    err = capsys.readouterr().err
    assert "warning: the validation split holds 50% of the text" in err and "1 of 2 documents" in err
    prepare(write_source("txt", tmp_path, DOCS[:200]), tmp_path / "q", tok, val_fraction=0.05)  # 10 of 200
    assert "warning" not in capsys.readouterr().err


def test_text_columns_that_hold_no_text_and_odd_settings_are_one_line_errors(tmp_path, tok):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "a.parquet")
    datasets.Dataset.from_dict({"text": [[1, 2], [3]]}).save_to_disk(str(tmp_path / "hf"))
    for name, kind in (("a.parquet", "int"), ("hf", "list")):
        with pytest.raises(DataError, match=f"column 'text' holds {kind} values, not text"):
            prepare(tmp_path / name, tmp_path / "out", tok)
    with pytest.raises(DataError, match="max_shard_tokens must be >= 1"):
        prepare(write_source("txt", tmp_path, DOCS[:3]), tmp_path / "out", tok, max_shard_tokens=0)
    (tmp_path / "out").mkdir(exist_ok=True)
    (tmp_path / "out" / "index.json").write_text("[]")  # JSON, but no index
    with pytest.raises(DataError, match="not a prepared dataset"):
        TokenDataset(tmp_path / "out", "train")
