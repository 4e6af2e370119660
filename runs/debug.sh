#!/usr/bin/env bash
# Seconds on CPU: the `debug` preset on Python's own help text, checkpoint, then resume to 40 steps.
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
out=${OUT:-runs}
corpus="$out/debug-corpus.txt"
mkdir -p "$out"
python -c "from pydoc_data.topics import topics; open('$corpus', 'w').write(chr(12).join(topics.values()))"
unipool train --preset debug --data.sources "$corpus" --data.tokenizer bpe:512 \
    --train.out-dir "$out" --train.run-name debug --train.steps 20 "$@"
unipool train --resume "$out/debug" --train.steps 40
