#!/usr/bin/env bash
# Pretrain Llama 2 7B from scratch on c4/en (tfds) with configs/llama2_7b.py.
#
#   scripts/pretrain_7b.sh --tpu NAME --zone ZONE --workdir gs://BUCKET/runs/llama2-7b \
#       --tfds-data-dir gs://BUCKET/tensorflow_datasets --tokenizer PATH/tokenizer.model \
#       [--num-slices N] [--project PROJECT] [--dry-run] [-- --config.KEY=VALUE ...]
#
# c4/en:3.1.0 must be prepared as ArrayRecord in the data dir once
# (`tfds build c4/en --file_format=array_record --data_dir gs://BUCKET/tensorflow_datasets`).
# Options as scripts/train.sh; rerun the same command to resume.
set -euo pipefail
exec "$(dirname "$0")/train.sh" --config configs/llama2_7b.py "$@"
