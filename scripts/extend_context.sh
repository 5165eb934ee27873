#!/usr/bin/env bash
# Extend Llama 2's context on a TPU VM slice: position-interpolation training on every worker.
#
#   scripts/extend_context.sh --tpu NAME --zone ZONE --init-from CKPT --workdir DIR \
#       --tfds-data-dir gs://BUCKET/tensorflow_datasets --tokenizer CKPT/tokenizer.model \
#       [--config configs/llama2_7b_extend_16k.py] [--project PROJECT] \
#       [--remote-dir ~/llamax] [--dry-run]
#
# Runs `llamax-train` with the config on all workers of the TPU VM at once (`gcloud compute
# tpus tpu-vm ssh --worker=all`), from REMOTE_DIR, where llamax is installed (`make install`).
# The paths are the workers' (a converted checkpoint on each worker's disk or on a bucket).
# A rerun with the same workdir resumes from its latest checkpoint. --dry-run prints the
# gcloud command instead of running it.
set -euo pipefail

usage() {
  sed -n '2,13s/^# \{0,1\}//p' "$0" >&2
  exit 2
}

tpu="" zone="" project="" init_from="" workdir="" data_dir="" tokenizer=""
# shellcheck disable=SC2088  # the workers' shell expands this tilde, not ours
config="configs/llama2_7b_extend_16k.py" remote_dir="~/llamax" dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) tpu="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --init-from) init_from="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    --tfds-data-dir) data_dir="$2"; shift 2 ;;
    --tokenizer) tokenizer="$2"; shift 2 ;;
    --config) config="$2"; shift 2 ;;
    --remote-dir) remote_dir="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage ;;
    *) echo "extend_context.sh: unknown argument $1" >&2; usage ;;
  esac
done
missing=()
for name in tpu zone init_from workdir data_dir tokenizer; do
  [[ -n "${!name}" ]] || missing+=("--${name//_/-}")
done
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "extend_context.sh: missing ${missing[*]/--data-dir/--tfds-data-dir}" >&2
  usage
fi
if [[ ! -f "$config" ]]; then
  echo "extend_context.sh: no config file $config (run from the llamax checkout)" >&2
  exit 2
fi

printf -v train '%q ' .venv/bin/llamax-train --config "$config" --workdir "$workdir" \
  "--config.init_from=$init_from" "--config.data.tfds_data_dir=$data_dir" \
  "--config.data.tokenizer=$tokenizer"
remote="cd $remote_dir && ${train% }"
cmd=(gcloud compute tpus tpu-vm ssh "$tpu" "--zone=$zone" --worker=all "--command=$remote")
if [[ -n "$project" ]]; then
  cmd+=("--project=$project")
fi
if [[ $dry_run -eq 1 ]]; then
  printf '%q ' "${cmd[@]}"
  echo
else
  "${cmd[@]}"
fi
