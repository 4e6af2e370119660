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


def test_resume_trains_with_the_configs_hyperparameters_not_the_checkpoints(dataset, tmp_path):
    """Loading optimizer state would bring back the saved weight decay, betas and eps; the run's config wins."""
    run, model, optimizer, sampler = make_state(dataset)
    train_step(model, optimizer, sampler)
    d = save(tmp_path, 1, run, model, optimizer, sampler)
    groups = param_groups(model, 0.1)
    for g in groups:
        g["lr_scale"] = 0.5
    resumed = torch.optim.AdamW(groups, lr=1e-3, betas=(0.8, 0.95), eps=1e-6)
    assert ckpt.restore_checkpoint(d, model, resumed, sampler, "none", DistInfo()) == 1
    decays = sorted({g["weight_decay"] for g in resumed.param_groups})
    assert decays == [0.0, 0.1] and optimizer.param_groups[0]["weight_decay"] == 0.01
    assert all(g["betas"] == (0.8, 0.95) and g["eps"] == 1e-6 and g["lr_scale"] == 0.5 for g in resumed.param_groups)
    saved = ckpt.load_torch(d / "optimizer.pt")["state"][0]["exp_avg"]  # the moments still come from the checkpoint
    assert torch.equal(resumed.state[next(iter(resumed.param_groups[0]["params"]))]["exp_avg"], saved)


def test_resume_refuses_a_new_batch_shape_or_seed(dataset):
    from unipool.config import resume_incompatibilities

    run, *_ = make_state(dataset)
    for field, value in (("batch_size", 64), ("grad_accum", 2), ("seq_len", 32), ("seed", 7)):
        new = run.replace(train=dataclasses.replace(run.train, **{field: value}))
        assert resume_incompatibilities(run, new) == [f"train.{field}"]
    assert resume_incompatibilities(run, run.replace(train=dataclasses.replace(run.train, lr=1.0, steps=9))) == []


def test_retention_after_a_rewind_keeps_the_resumed_branch(dataset, tmp_path):
    """Rewinding LATEST to an earlier checkpoint (what a non-finite checkpoint's error advises): the later
    checkpoints are left alone, and keep_last still counts the branch that is training now."""
    run, model, optimizer, sampler = make_state(dataset)
    run = run.replace(train=dataclasses.replace(run.train, keep_last=3, keep_every=0))
    root = tmp_path / "checkpoints"
    for step in (10, 15, 20):
        save(tmp_path, step, run, model, optimizer, sampler)
    weights.write_latest(root, "step_000010")
    for step in (11, 12, 13):
        save(tmp_path, step, run, model, optimizer, sampler)
    assert [s for s, _ in weights.list_checkpoints(root)] == [11, 12, 13, 15, 20]
    save(tmp_path, 15, run, model, optimizer, sampler)  # the branch reaches a step the old one wrote: replaced
    assert [s for s, _ in weights.list_checkpoints(root)] == [12, 13, 15, 20]
    assert (root / "LATEST").read_text().strip() == "step_000015"


def test_cuda_generators_restore_on_fewer_visible_gpus(monkeypatch):
    """A state saved with 3 visible GPUs, restored where 1 is visible: that one gets its state back (no GPU
    here, so torch.cuda's three calls are stood in for)."""
    state = ckpt.rng_state()
    state["cuda"] = [torch.full((4,), i, dtype=torch.uint8) for i in range(3)]
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, i: restored.__setitem__(i, s))
    ckpt.set_rng_state(state)
    assert list(restored) == [0] and torch.equal(restored[0], state["cuda"][0])
