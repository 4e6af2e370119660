"""2-process gloo runs on CPU (torchrun -m unipool.train): DDP and FSDP2 match one process on the same
global batch.

The balancing losses are switched off here on purpose: their statistics are per rank (as in Megatron),
so with them on, 2 ranks legitimately differ from 1 process. Without them, the per-step loss is the
mean over the global batch either way, and the averaged gradients are the same up to fp32 rounding.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from pydoc_data.topics import topics

import pytest
import torch

from unipool import cli
from unipool.weights import load_model

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    corpus = root / "topics.txt"
    corpus.write_text("\f".join(topics[k] for k in sorted(topics)[:40]))
    args = ["--preset", "debug", "--data.sources", str(corpus), "--data.tokenizer", "bpe:300",
            "--data.data-dir", str(root / "data"), "--train.out-dir", str(root), "--train.progress", "false",
            "--train.precision", "fp32", "--train.steps", "3", "--train.grad-accum", "2", "--train.log-interval", "1",
            "--train.eval-tokens", "256", "--train.sample-tokens", "0", "--set", "train.batch_size=4",
            "--set", "train.seq_len=32", "--set", "model.pool_loss_coef=0"]
    assert cli.main(["train", *args, "--train.run-name", "single", *PLAIN]) == 0
    return root, args


def losses(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r], [r["val_loss"] for r in lines if "val_loss" in r]


# The single-process reference runs the plain pool weight gradient; the runs here take the default, the
# pool's weight gradient fused over all layers (exec.fused_pool_wgrad), which DDP and FSDP2 must reduce only
# once it exists. fsdp+plain: without it; fsdp+ac: with activation checkpointing, which recomputes the layer
# that binds the pool's weights. All with 2 micro-batches per step (setup's --train.grad-accum 2).
PLAIN = ["--set", "exec.fused_pool_wgrad=false"]
EXTRA = {"ddp": [], "fsdp": [], "fsdp+plain": PLAIN, "fsdp+ac": ["--set", "exec.activation_checkpointing=true"]}


@pytest.mark.parametrize("name", list(EXTRA))
def test_two_process_gloo_matches_single_process(setup, name):
    root, args = setup
    mode = name.split("+")[0]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "unipool.train", *args, "--train.run-name", name, "--train.distributed", mode, *EXTRA[name]]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{mode} x2" in proc.stdout

    single_train, single_val = losses(root / "single")
    dist_train, dist_val = losses(root / name)
    assert len(dist_train) == 3
    assert dist_train == pytest.approx(single_train, rel=1e-5)
    assert dist_val == pytest.approx(single_val, rel=1e-5)
    # the saved weights are the full (gathered) model and agree with the single process (the routing
    # buffers are per-rank statistics and are not compared)
    a, _ = load_model(root / "single")
    b, meta_b = load_model(root / name)
    assert meta_b["world_size"] == 2
    # The fused gradient sums in another order than the plain one, and AdamW's first steps turn that rounding
    # into weight differences up to ~1e-5 where a gradient is near zero (as in one process: fused vs plain);
    # a lost pool gradient would differ by ~lr = 3e-3. The gradients themselves: the next test.
    atol = 1e-5 if "plain" in name else 5e-5
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=atol, msg=name)


GRADS = """
import dataclasses, sys
import torch
import torch.distributed as dist
from unipool.model.model import Unipool
from unipool.presets import get_preset
from unipool.train import distributed as ud

dist.init_process_group("gloo")
torch.manual_seed(0)
cfg = dataclasses.replace(get_preset("debug"), pool_loss_coef=0.0)  # both ranks see the same batches
ids = torch.randint(0, cfg.vocab_size, (2, 2, 16), generator=torch.Generator().manual_seed(1))
ref = Unipool(cfg)
ref.init_weights()
for ids_BS in ids:  # the plain path in one process, 2 micro-batches
    out = ref(ids_BS, ids_BS)
    ((out.loss + out.aux_loss) / 2).backward()
for checkpointing in (False, True):
    model = Unipool(cfg)
    model.load_state_dict(ref.state_dict())
    model.set_execution(fused_pool_wgrad=True, activation_checkpointing=checkpointing)
    ud.wrap(model, "fsdp", torch.device("cpu"))
    for i, ids_BS in enumerate(ids):
        with ud.no_sync(model, "fsdp", i == 0):
            out = model(ids_BS, ids_BS)
            ((out.loss + out.aux_loss) / 2).backward()
    for (name, p), q in zip(ref.named_parameters(), model.parameters()):
        err = float((q.grad.full_tensor() - p.grad).norm() / p.grad.norm())
        if dist.get_rank() == 0:
            print(checkpointing, name, err)
dist.destroy_process_group()
"""


def test_fsdp_fused_pool_gradient_equals_the_plain_gradient(tmp_path):
    """Under FSDP2 the pool's fused gradient is reduced once it exists, not before: every parameter's
    gradient after 2 accumulated micro-batches equals the plain single-process one (a gradient lost or
    reduced twice would show here; AdamW's scale invariance would hide it in the weights)."""
    script = tmp_path / "grads.py"
    script.write_text(GRADS)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith(("False ", "True "))]
    assert {r[0] for r in rows} == {"False", "True"} and any("experts" in r[1] for r in rows)
    for checkpointing, name, err in rows:
        assert float(err) < 1e-5, (checkpointing, name, err)


def test_ddp_trains_random_routing_without_a_balance_loss(setup):
    """Random routing's router weights get no gradient when no balance loss reads their logits: they are
    frozen, instead of DDP failing in its second step for want of their gradient."""
    root, args = setup
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "unipool.train", *args, "--train.run-name", "ddp-random", "--train.distributed", "ddp",
           "--set", "model.router=random"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(losses(root / "ddp-random")[0]) == 3


def test_each_rank_sets_its_own_gpu_before_the_first_collective(monkeypatch):
    """NCCL's object collectives use the current CUDA device: each rank must make its LOCAL_RANK's GPU
    current, or all would use GPU 0. No GPU here: torch.cuda.set_device and the process group stand in."""
    from unipool.train import distributed

    calls = []
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 3)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 4)
    info = distributed.init("cuda")
    assert calls == [1] and (info.rank, info.local_rank, info.world_size) == (3, 1, 4)
    assert distributed.init("cpu").local_rank == 1 and calls == [1]  # gloo on CPU: no device to set
