#!/usr/bin/env bash
# Extend Llama 2's context by position interpolation: continued training on every worker.
#
#   scripts/extend_context.sh --tpu NAME --zone ZONE --init-from CKPT --workdir DIR \
#       --tfds-data-dir gs://BUCKET/tensorflow_datasets --tokenizer CKPT/tokenizer.model \
#       [--config configs/llama2_7b_extend_16k.py] [--num-slices N] [--project PROJECT] \
#       [--dry-run] [-- --config.KEY=VALUE ...]
#
# Default config: 16k tokens (configs/llama2_7b_extend_32k.py for 32k). Then evaluate with
# llamax-eval perplexity and passkey (docs/context_extension.md). Options as
# scripts/train.sh; rerun the same command to resume.
set -euo pipefail
[[ " $* " == *" --init-from "* ]] || { echo "extend_context.sh: missing --init-from" >&2; exit 2; }
exec "$(dirname "$0")/train.sh" --config configs/llama2_7b_extend_16k.py "$@"
