#!/usr/bin/env bash
# Continue training from converted weights (llamax-convert --from meta --to llamax ...).
#
#   scripts/continue_training.sh --tpu NAME --zone ZONE --init-from CKPT --workdir DIR \
#       --tfds-data-dir gs://BUCKET/tensorflow_datasets --tokenizer CKPT/tokenizer.model \
#       [--config configs/llama2_7b.py] [--num-slices N] [--project PROJECT] [--dry-run] \
#       [-- --config.optimizer.learning_rate=3e-5 ...]
#
# Starts from CKPT's parameters (a fresh optimizer) with the config's recipe (default the
# 7B pretraining config; give the learning rate and steps you want after --). Options as
# scripts/train.sh; rerun the same command to resume.
set -euo pipefail
[[ " $* " == *" --init-from "* ]] || { echo "continue_training.sh: missing --init-from" >&2; exit 2; }
exec "$(dirname "$0")/train.sh" --config configs/llama2_7b.py "$@"
