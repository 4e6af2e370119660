#!/usr/bin/env bash
# Data parallel on CPU with gloo: 2 processes, each taking its half of every global batch.
# MODE=fsdp shards parameters, gradients and optimizer state with FSDP2 instead of DDP.
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
torchrun --standalone --nproc_per_node 2 -m unipool.train \
    --train.distributed "${MODE:-ddp}" --train.run-name "demo-${MODE:-ddp}" "$@"
