#!/usr/bin/env bash
# Run llamax-train on every worker of a TPU VM slice (or multi-slice queued resource).
#
#   scripts/train.sh --tpu NAME --zone ZONE --config configs/X.py --workdir DIR \
#       [--init-from CKPT] [--tfds-data-dir gs://BUCKET/tensorflow_datasets] \
#       [--tokenizer PATH] [--num-slices N] [--project PROJECT] [--dry-run] \
#       [-- --config.KEY=VALUE ...]
#
# The paths are the workers' (their disks, or gs:// buckets); llamax is installed in ~/llamax
# (scripts/tpu_vm.sh setup). A gs:// --tfds-data-dir is mounted with gcsfuse on every worker
# at ~/llamax/gcs/BUCKET (scripts/mount_bucket.sh: tfds's ArrayRecord files are read from
# local paths only). All workers start together and form one JAX cluster; a rerun with the
# same workdir resumes from the latest checkpoint, which is how a preempted run continues.
# Arguments after -- are passed to llamax-train.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

usage() {
  sed -n '2,15s/^# \{0,1\}//p' "$0" >&2
  exit 2
}

tpu="" zone="" project="" config="" workdir="" init_from="" data_dir="" tokenizer=""
num_slices=1 dry_run=0 extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) tpu="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --config) config="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    --init-from) init_from="$2"; shift 2 ;;
    --tfds-data-dir) data_dir="$2"; shift 2 ;;
    --tokenizer) tokenizer="$2"; shift 2 ;;
    --num-slices) num_slices="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) usage ;;
    *) echo "train.sh: unknown argument $1" >&2; usage ;;
  esac
done
missing=()
for name in tpu zone config workdir; do
  [[ -n "${!name}" ]] || missing+=("--${name}")
done
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "train.sh: missing ${missing[*]}" >&2
  usage
fi
if [[ ! -f "$here/../$config" && ! -f "$config" ]]; then
  echo "train.sh: no config file $config" >&2
  exit 2
fi

mount=()
if [[ "$data_dir" == gs://* ]]; then
  bucket="${data_dir#gs://}"
  bucket="${bucket%%/*}"
  mount=(scripts/mount_bucket.sh "$bucket" "gcs/$bucket")
  data_dir="gcs/$bucket${data_dir#"gs://$bucket"}"
fi
train=(.venv/bin/llamax-train --config "$config" --workdir "$workdir")
[[ -z "$init_from" ]] || train+=("--config.init_from=$init_from")
[[ -z "$data_dir" ]] || train+=("--config.data.tfds_data_dir=$data_dir")
[[ -z "$tokenizer" ]] || train+=("--config.data.tokenizer=$tokenizer")
train+=(${extra[@]+"${extra[@]}"})
vm=(--tpu "$tpu" --zone "$zone" --num-slices "$num_slices")
[[ -z "$project" ]] || vm+=(--project "$project")
[[ $dry_run -eq 0 ]] || vm+=(--dry-run)
if [[ ${#mount[@]} -gt 0 ]]; then
  printf -v first '%q ' "${mount[@]}"
  printf -v rest '%q ' "${train[@]}"
  train=(bash -c "${first% } && ${rest% }")
fi
exec "$here/tpu_vm.sh" run "${vm[@]}" -- "${train[@]}"
