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
from pydoc_data.topics import topics

import pytest
import torch

from unipool import cli
from unipool.train.checkpoint import load_model

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
    assert cli.main(["train", *args, "--train.run-name", "single"]) == 0
    return root, args


def losses(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r], [r["val_loss"] for r in lines if "val_loss" in r]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_process_gloo_matches_single_process(setup, mode):
    root, args = setup
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "unipool.train", *args, "--train.run-name", mode, "--train.distributed", mode]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{mode} x2" in proc.stdout

    single_train, single_val = losses(root / "single")
    dist_train, dist_val = losses(root / mode)
    assert len(dist_train) == 3
    assert dist_train == pytest.approx(single_train, rel=1e-5)
    assert dist_val == pytest.approx(single_val, rel=1e-5)
    # the saved weights are the full (gathered) model and agree with the single process (the routing
    # buffers are per-rank statistics and are not compared)
    a, _ = load_model(root / "single")
    b, meta_b = load_model(root / mode)
    assert meta_b["world_size"] == 2
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
