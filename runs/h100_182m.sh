#!/usr/bin/env bash
# The paper's 182M UniPool (M = 96 shared experts, NormRouter, pool loss 1e-2) with its recipe (UniPool
# Table 8): global batch 512 x 1024 tokens, 60,000 steps (31.5B tokens), AdamW 5e-4 -> 5e-5 cosine,
# warmup 1%, clip 1.0, bf16; micro-batch 16 per GPU; validation every 1000 steps on ~52M tokens.
#
# Prepare the data once, with every core, outside torchrun (GPT-2 BPE, as the paper):
#   unipool prepare corpus/*.jsonl.zst --out data/corpus-gpt2 --tokenizer gpt2 --workers $(nproc)
# then:
#   runs/h100_182m.sh data/corpus-gpt2                          # trains on it as it is (never re-prepared)
#   PRESET=vanilla-182m runs/h100_182m.sh data/corpus-gpt2      # the per-layer MoE baseline
#   runs/h100_182m.sh data/corpus-gpt2 --resume runs/NAME        # continue a run (same number of GPUs)
# train.batch_size is global (summed over ranks): 16 per GPU here, grad-accum makes up the 512.
# TensorBoard logs need the extra: pip install -e '.[all,tensorboard]' (without it: a warning, metrics.jsonl).
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
DATA=${1:?usage: runs/h100_182m.sh PREPARED_DIR [extra unipool train flags]}
shift
NGPU=${NGPU:-$(nvidia-smi -L | wc -l)}
MICRO=16
torchrun --standalone --nproc_per_node "$NGPU" -m unipool.train \
    --preset "${PRESET:-unipool-182m}" --data.prepared "$DATA" \
    --train.distributed fsdp --train.precision bf16 \
    --train.batch-size $((MICRO * NGPU)) --train.grad-accum $((512 / (MICRO * NGPU))) --train.seq-len 1024 \
    --train.steps 60000 --train.eval-interval 1000 --train.eval-tokens 52428800 \
    --train.ckpt-interval 1000 --train.keep-every 10000 --train.routing-interval 100 \
    --train.sample-prompt "The" --train.tensorboard true "$@"
