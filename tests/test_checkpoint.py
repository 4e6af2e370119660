"""Training checkpoints: atomic under a crash, retention, RNG round trip, one-line errors for bad files."""

import dataclasses
import json
import os
import random
import shutil
from pydoc_data.topics import topics

import numpy as np
import pytest
import torch

from unipool import cli, weights
from unipool.config import preset_config
from unipool.data.dataset import TokenDataset, WindowSampler
from unipool.data.prepare import prepare
from unipool.data.tokenizer import train_bpe
from unipool.model.model import build_model
from unipool.train import checkpoint as ckpt
from unipool.train.distributed import DistInfo
from unipool.train.loop import param_groups
from unipool.weights import load_model, resolve_checkpoint


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "topics.txt"
    path.write_text("\f".join(topics[k] for k in sorted(topics)[:40]))
    return path


@pytest.fixture(scope="module")
def dataset(corpus, tmp_path_factory):
    out = prepare([corpus], tmp_path_factory.mktemp("data"), train_bpe([corpus], 300), num_workers=1)
    return TokenDataset(out, "train")


def make_state(dataset):
    run = preset_config("debug")
    run = run.replace(model=run.model.replace(vocab_size=dataset.vocab_size))
    model = build_model(run.model)
    optimizer = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-3)
    sampler = WindowSampler(dataset, 2, 16, seed=3)
    return run, model, optimizer, sampler


def train_step(model, optimizer, sampler):
    x, y = sampler.next_batch()
    out = model(x, y)
    model.update_routing_state(out)
    (out.loss + out.aux_loss).backward()
    optimizer.step()
    optimizer.zero_grad()


def save(run_dir, step, run, model, optimizer, sampler):
    return ckpt.save_checkpoint(run_dir / "checkpoints", step, step * 32, model, optimizer, sampler, "none",
                                DistInfo(), run.train.keep_last, run.train.keep_every)


def test_crash_during_save_keeps_previous_checkpoint(dataset, tmp_path, monkeypatch):
    run, model, optimizer, sampler = make_state(dataset)
    train_step(model, optimizer, sampler)
    save(tmp_path, 1, run, model, optimizer, sampler)
    saved_1 = {k: v.clone() for k, v in model.state_dict().items()}
    train_step(model, optimizer, sampler)
    root = tmp_path / "checkpoints"

    def crash(*args):
        raise OSError("simulated crash")

    for where in ("rename", "replace"):  # publishing the directory, then replacing LATEST
        monkeypatch.setattr(ckpt.os, where, crash)
        with pytest.raises(OSError, match="simulated crash"):
            save(tmp_path, 2, run, model, optimizer, sampler)
        monkeypatch.undo()
        assert (root / "LATEST").read_text().strip() == "step_000001"
        assert resolve_checkpoint(tmp_path) == root / "step_000001"
        loaded, meta = load_model(tmp_path)
        assert meta["step"] == 1
        for k, v in loaded.state_dict().items():
            assert torch.equal(v, saved_1[k]), k
    # after the second crash step_000002 is complete but unpublished; a new save replaces it cleanly
    final = save(tmp_path, 2, run, model, optimizer, sampler)
    assert final == root / "step_000002" and (root / "LATEST").read_text().strip() == "step_000002"
    assert not list(root.glob(".tmp_*")) and not (root / "LATEST.tmp").exists()
    loaded, _ = load_model(tmp_path)
    assert torch.equal(loaded.tok_embeddings.weight, model.tok_embeddings.weight)


def test_retention_keeps_last_and_every_kth(dataset, tmp_path):
    run, model, optimizer, sampler = make_state(dataset)
    run = run.replace(train=dataclasses.replace(run.train, keep_last=2, keep_every=4))
    for step in range(1, 10):
        save(tmp_path, step, run, model, optimizer, sampler)
    assert [s for s, _ in weights.list_checkpoints(tmp_path / "checkpoints")] == [4, 8, 9]


def test_training_state_round_trip(dataset, tmp_path):
    """Optimizer, sampler, routing buffers and every RNG come back exactly (weights_only loads)."""
    run, model, optimizer, sampler = make_state(dataset)
    for _ in range(2):
        train_step(model, optimizer, sampler)
    random.seed(7)
    np.random.seed(7)
    d = save(tmp_path, 2, run, model, optimizer, sampler)
    expect = (random.random(), np.random.rand(), torch.rand(3))
    state = ckpt.load_torch(d / "state_rank0.pt")
    ckpt.set_rng_state(state["rng"])
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert expect[:2] == got[:2] and torch.equal(expect[2], got[2])
    assert state["sampler"] == {"step": 2, "seed": 3}
    assert torch.equal(state["buffers"]["pool_load_PE"], model.pool_load_PE)
    assert bool(state["buffers"]["pool_load_valid"])
    opt = ckpt.load_torch(d / "optimizer.pt")
    assert opt["state"][0]["step"] == 2 and torch.equal(opt["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])


@pytest.fixture(scope="module")
def trained_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    rc = cli.main(["train", "--preset", "debug", "--data.sources", str(corpus), "--data.tokenizer", "bpe:300",
                   "--data.data-dir", str(out / "data"), "--train.out-dir", str(out), "--train.run-name", "r",
                   "--train.steps", "2", "--train.eval-tokens", "64", "--train.sample-tokens", "0",
                   "--train.progress", "false", "--set", "train.batch_size=2", "--set", "train.seq_len=16"])
    assert rc == 0
    return out / "r"


@pytest.mark.parametrize("damage, expected", [
    (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 20), "corrupt weights"),
    (lambda d: (d / "optimizer.pt").write_bytes(b"not a zip file"), "corrupt"),
    (lambda d: (d / "state_rank0.pt").unlink(), "missing"),
    (lambda d: (d / "meta.json").write_text("{"), "corrupt"),
    (lambda d: shutil.rmtree(d), "has no model.safetensors"),
], ids=["weights", "optimizer", "rank-state", "meta", "deleted"])
def test_resume_from_damaged_checkpoint_is_one_line(trained_run, tmp_path, capsys, damage, expected):
    run = tmp_path / "r"
    shutil.copytree(trained_run, run)
    damage(run / "checkpoints" / "step_000002")
    rc = cli.main(["train", "--resume", str(run), "--train.steps", "3"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and expected in err and "\n" not in err, err


def test_checkpoint_meta_and_files(trained_run):
    d = resolve_checkpoint(trained_run)
    meta = json.loads((d / "meta.json").read_text())
    assert meta["step"] == 2 and meta["world_size"] == 1 and meta["model"]["moe_mode"] == "pool"
    assert sorted(p.name for p in d.iterdir()) == ["meta.json", "model.safetensors", "optimizer.pt", "state_rank0.pt"]
    assert os.path.getsize(d / "model.safetensors") > 0
