"""evaluate() against a hand loop of F.cross_entropy, batching of raw text, and `unipool eval`."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import TEXTS, make_run  # noqa: F401

from unipool.analysis.eval import evaluate
from unipool.cli import main
from unipool.data.dataset import text_tokens, window_batches
from unipool.data.tokenizer import Tokenizer
from unipool.run import Run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("evalrun") / "run")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("evaltext") / "held_out.txt"
    path.write_text("\f".join(t.strip() for t in TEXTS[-8:]))  # 8 documents, split at form feeds
    return path


def test_evaluate_equals_hand_loop(run):
    _, model = run
    tok = Tokenizer.load(run[0])
    stream = tok.encode(TEXTS[3] + TEXTS[4])[:701]  # 700 targets: 10 windows of 64 and a tail of 60
    assert len(stream) == 701
    result = evaluate(model, window_batches(stream, 3, 64))
    assert result["tokens"] == 700 and result["batches"] == 5  # 3 + 3 + 3 + 1 full windows, then the tail

    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, 700, 64):
            x = torch.tensor(stream[start:min(start + 64, 700)])
            y = torch.tensor(stream[start + 1:start + 65])
            logits = model(x[None]).logits[0]
            total += F.cross_entropy(logits, y).item() * len(y)
            count += len(y)
    assert count == 700
    assert result["loss"] == pytest.approx(total / count, rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    # a randomly initialised model is close to uniform over the vocabulary
    assert abs(result["loss"] - math.log(model.config.vocab_size)) < 0.5


def test_window_batches_cover_stream_once():
    stream = list(range(100, 200))
    batches = list(window_batches(stream, batch_size=2, seq_len=16, max_tokens=90))
    inputs = torch.cat([x.reshape(-1) for x, _ in batches]).tolist()
    targets = torch.cat([y.reshape(-1) for _, y in batches]).tolist()
    assert targets == stream[1:91]  # every target once, in order, capped at max_tokens
    assert inputs == stream[:90]
    assert [tuple(x.shape) for x, _ in batches] == [(2, 16), (2, 16), (1, 16), (1, 10)]


def test_evaluate_ignores_masked_targets_and_restores_mode(run):
    _, model = run
    x = torch.randint(0, model.config.vocab_size, (2, 16))
    y = torch.randint(0, model.config.vocab_size, (2, 16))
    y_masked = y.clone()
    y_masked[:, 8:] = -100
    model.train()
    result = evaluate(model, [(x, y_masked)])
    assert model.training
    assert result["tokens"] == 16
    with torch.no_grad():
        logits = model(x).logits
    assert result["loss"] == pytest.approx(F.cross_entropy(logits[:, :8].reshape(-1, logits.shape[-1]),
                                                           y[:, :8].reshape(-1)).item(), rel=1e-5)
    model.eval()


def test_cli_eval_raw_text_and_jsonl(run, text_file, tmp_path, capsys):
    root, model = run
    assert main(["eval", str(root), "--data", str(text_file), "--max-tokens", "300", "--batch-size", "2",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] == 300 and out["step"] == 10 and out["seq_len"] == 64  # the run's training seq_len
    tokens = text_tokens(text_file, Tokenizer.load(root / "tokenizer.json"))
    assert tokens.count(Tokenizer.load(root).eos_id) == 8 and tokens[-1] == Tokenizer.load(root).eos_id
    expected = evaluate(model, window_batches(tokens, 2, 64, 300))
    assert out["loss"] == pytest.approx(expected["loss"], rel=1e-6)

    # bf16 autocast: the same tokens, a loss within bf16 rounding of the fp32 one
    assert main(["eval", str(root), "--data", str(text_file), "--max-tokens", "300", "--batch-size", "2",
                 "--json", "--bf16"]) == 0
    bf16 = json.loads(capsys.readouterr().out)
    assert bf16["tokens"] == 300 and bf16["loss"] == pytest.approx(out["loss"], abs=0.05)

    # the same documents as JSON lines (one per line) give the same tokens and loss
    jsonl = tmp_path / "held_out.jsonl"
    jsonl.write_text("".join(json.dumps({"body": doc}) + "\n" for doc in text_file.read_text().split("\f")))
    assert main(["eval", str(root / "checkpoints" / "step_000010"), "--data", str(jsonl), "--text-field", "body",
                 "--max-tokens", "300", "--batch-size", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(out["loss"], rel=1e-6)


def test_cli_eval_prepared_dir_is_the_default(tmp_path, text_file, capsys):
    from unipool.data.dataset import TokenDataset, eval_batches
    from unipool.data.prepare import prepare

    tok = Tokenizer.load(make_run(tmp_path / "tok")[0])
    data_dir = prepare([text_file], tmp_path / "data", tok, val_fraction=0.25)
    root, model = make_run(tmp_path / "run", data_dir=str(data_dir))
    assert main(["eval", str(root), "--json", "--max-tokens", "256", "--seq-len", "32"]) == 0
    out = json.loads(capsys.readouterr().out)
    expected = evaluate(model, eval_batches(TokenDataset(data_dir, "val"), 8, 32, 256))
    assert out["tokens"] == expected["tokens"] > 0
    assert out["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    assert main(["eval", str(root), "--data", str(data_dir), "--split", "train", "--json", "--max-tokens", "128"]) == 0
    assert json.loads(capsys.readouterr().out)["data"].endswith("(train)")


def test_cli_eval_errors_are_one_line(run, tmp_path, capsys):
    root, _ = run
    cases = [
        (["eval", str(tmp_path / "nope")], "no such run"),
        (["eval", str(root), "--data", str(tmp_path / "missing.txt")], "no such data"),
        (["eval", str(root)], "no prepared data directory"),  # the run names no data_dir
        (["eval", str(root), "--data", str(root / "config.json"), "--seq-len", "4096"], "max_seq_len"),
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    cases.append((["eval", str(root), "--data", str(bad)], "line 2"))
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and message in err and len(err.strip().splitlines()) == 1, err


def test_load_run_finds_run_from_checkpoint(run):
    root, _ = run
    loaded = Run.open(root / "checkpoints" / "step_000010" / "model.safetensors")
    assert loaded.path == root and loaded.step == 10 and loaded.train_seq_len == 64
    assert loaded.tokenizer().vocab_size == loaded.load_model().config.vocab_size
