"""Prepare once, then train on the prepared directory as it is (the multi-GPU path); refusals in one line;
a resume on changed data says so."""

import json
import shutil

import pytest

from unipool import cli


def train_args(out, name, *extra):
    return ["train", "--preset", "debug", "--train.out-dir", str(out), "--train.run-name", name,
            "--train.progress", "false", "--train.steps", "4", "--set", "train.batch_size=4", "--set",
            "train.seq_len=32", "--train.sample-tokens", "0", "--train.eval-tokens", "128", *extra]


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "data"
    assert cli.main(["prepare", str(corpus), "--out", str(out), "--tokenizer", "bpe:300", "--workers", "1"]) == 0
    return out


def test_train_on_a_prepared_directory_without_sources(prepared, tmp_path, capsys):
    index_before = (prepared / "index.json").read_text()
    shards_before = {p.name: p.stat().st_mtime_ns for p in prepared.glob("*.bin")}
    assert cli.main(train_args(tmp_path, "p", "--data.prepared", str(prepared))) == 0
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert config["data"]["data_dir"] == str(prepared) and config["model"]["vocab_size"] == 300
    assert (prepared / "index.json").read_text() == index_before  # never prepared again
    assert {p.name: p.stat().st_mtime_ns for p in prepared.glob("*.bin")} == shards_before
    assert (tmp_path / "p" / "tokenizer.json").read_bytes() == (prepared / "tokenizer.json").read_bytes()
    # and it resumes on the same directory
    assert cli.main(["train", "--resume", str(tmp_path / "p"), "--train.steps", "6"]) == 0
    assert "differs from what" not in capsys.readouterr().out


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_refusals_are_one_line(prepared, tmp_path, capsys):
    # another tokenizer than the directory's
    assert cli.main(train_args(tmp_path, "a", "--data.prepared", str(prepared), "--data.tokenizer", "gpt2")) == 2
    assert "was prepared with another tokenizer" in one_line_error(capsys)
    # not a prepared directory
    assert cli.main(train_args(tmp_path, "b", "--data.prepared", str(tmp_path))) == 2
    assert "is not a prepared directory" in one_line_error(capsys)
    # sources and a prepared directory together
    assert cli.main(train_args(tmp_path, "c", "--data.prepared", str(prepared), "--data.sources", "x.txt")) == 2
    assert "give one of them" in one_line_error(capsys)
    # --data.data-dir on someone's prepared data, no sources: it would have been overwritten with Shakespeare
    index_before = (prepared / "index.json").read_text()
    assert cli.main(train_args(tmp_path, "d", "--data.data-dir", str(prepared), "--data.tokenizer", "bpe:300")) == 2
    assert f"--data.prepared {prepared}" in one_line_error(capsys)
    assert (prepared / "index.json").read_text() == index_before


def test_resume_on_changed_data_says_so(corpus, tmp_path, capsys):
    source = tmp_path / "text.txt"
    shutil.copyfile(corpus, source)
    data = tmp_path / "cache"
    args = train_args(tmp_path, "r", "--data.sources", str(source), "--data.tokenizer", "bpe:300",
                      "--data.data-dir", str(data))
    assert cli.main(args) == 0
    capsys.readouterr()
    shutil.rmtree(data)  # the cache is gone and the text has grown: the run's own tokenizer is reused
    source.write_text(source.read_text() + "\f" + "An appended scene. " * 200)
    assert cli.main(["train", "--resume", str(tmp_path / "r"), "--train.steps", "6"]) == 0
    out = capsys.readouterr().out
    note = [line for line in out.splitlines() if line.startswith("note: the training data differs")]
    assert len(note) == 1 and "not comparable" in note[0] and "train_tokens" in note[0], out
