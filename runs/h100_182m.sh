#!/usr/bin/env bash
# The paper's 182M UniPool (M = 96 shared experts, NormRouter, pool loss 1e-2) with its recipe (UniPool
# Table 8): global batch 512 x 1024 tokens, 60,000 steps (31.5B tokens), AdamW 5e-4 -> 5e-5 cosine,
# warmup 1%, clip 1.0, bf16; micro-batch 16 per GPU; validation every 1000 steps on ~52M tokens.
# Usage: runs/h100_182m.sh DATA_FILES...   (text / jsonl / parquet; tokenized with the GPT-2 BPE)
#        PRESET=vanilla-182m runs/h100_182m.sh ...   for the per-layer MoE baseline
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
NGPU=${NGPU:-$(nvidia-smi -L | wc -l)}
MICRO=16
torchrun --standalone --nproc_per_node "$NGPU" -m unipool.train \
    --preset "${PRESET:-unipool-182m}" --data.tokenizer gpt2 --data.sources "$@" \
    --train.distributed fsdp --train.precision bf16 \
    --train.batch-size $((MICRO * NGPU)) --train.grad-accum $((512 / (MICRO * NGPU))) --train.seq-len 1024 \
    --train.steps 60000 --train.eval-interval 1000 --train.eval-tokens 52428800 \
    --train.ckpt-interval 1000 --train.keep-every 10000 --train.routing-interval 100 \
    --train.sample-prompt "The" --train.tensorboard true
