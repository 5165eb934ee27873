#!/usr/bin/env bash
# Create, set up and use a TPU VM slice (or several, as one multi-slice queued resource).
#
#   scripts/tpu_vm.sh create --tpu NAME --zone ZONE --type v5e-16 [--num-slices N] [--spot]
#   scripts/tpu_vm.sh setup  --tpu NAME --zone ZONE --repo GIT_URL [--ref REF]
#   scripts/tpu_vm.sh run    --tpu NAME --zone ZONE [--num-slices N] -- COMMAND ...
#   scripts/tpu_vm.sh delete --tpu NAME --zone ZONE [--num-slices N]
#   common options: [--project PROJECT] [--dry-run]
#
# create: one slice is a TPU VM (`gcloud compute tpus tpu-vm create`); --num-slices N > 1
#   asks for a queued resource of N slices (`gcloud compute tpus queued-resources create
#   --node-count N`), whose workers find each other through the MEGASCALE_* variables that
#   llamax-train reads. --spot asks for preemptible capacity (resume after preemption by
#   running the same command again).
# setup: on every worker, Python 3.11, a clone of llamax (GIT_URL, at REF: default main) in
#   ~/llamax, and a virtual environment with llamax and the TPU runtime (`.[tpu]`).
# run: COMMAND on every worker of every slice at once, from ~/llamax.
# --dry-run prints the gcloud commands instead of running them.
set -euo pipefail

usage() {
  sed -n '2,20s/^# \{0,1\}//p' "$0" >&2
  exit 2
}

[[ $# -gt 0 ]] || usage
action="$1"
shift
tpu="" zone="" project="" type="" num_slices=1 spot=0 dry_run=0
repo="" ref="main" command=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) tpu="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --type) type="$2"; shift 2 ;;
    --num-slices) num_slices="$2"; shift 2 ;;
    --spot) spot=1; shift ;;
    --repo) repo="$2"; shift 2 ;;
    --ref) ref="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; command=("$@"); break ;;
    -h|--help) usage ;;
    *) echo "tpu_vm.sh: unknown argument $1" >&2; usage ;;
  esac
done

fail() {
  echo "tpu_vm.sh: $*" >&2
  exit 2
}
[[ -n "$tpu" && -n "$zone" ]] || fail "--tpu and --zone are required"
[[ "$num_slices" =~ ^[1-9][0-9]*$ ]] || fail "--num-slices must be a positive integer"

gcloud_run() {  # print (dry run) or run one gcloud command
  if [[ $dry_run -eq 1 ]]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

scope=("--zone=$zone")
if [[ -n "$project" ]]; then
  scope+=("--project=$project")
fi

runtime_version() {  # the TPU VM image for a slice type
  case "$1" in
    v4-*) echo "tpu-ubuntu2204-base" ;;
    v5e-* | v5litepod-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) fail "unknown slice type $1: expected v4-N, v5e-N (or v5litepod-N), v5p-N or v6e-N" ;;
  esac
}

accelerator_type() {  # gcloud's name of a slice type: v5e slices are v5litepod-N there
  case "$1" in
    v5e-*) echo "v5litepod-${1#v5e-}" ;;
    *) echo "$1" ;;
  esac
}

on_all_workers() {  # $1: the remote shell command
  if [[ $num_slices -gt 1 ]]; then
    gcloud_run gcloud compute tpus queued-resources ssh "$tpu" "${scope[@]}" \
      --worker=all --node=all "--command=$1"
  else
    gcloud_run gcloud compute tpus tpu-vm ssh "$tpu" "${scope[@]}" --worker=all "--command=$1"
  fi
}

case "$action" in
  create)
    [[ -n "$type" ]] || fail "create needs --type (e.g. v5e-16)"
    version="$(runtime_version "$type")"
    accelerator="$(accelerator_type "$type")"
    if [[ $num_slices -gt 1 ]]; then
      args=(gcloud compute tpus queued-resources create "$tpu" "${scope[@]}"
        "--accelerator-type=$accelerator" "--runtime-version=$version"
        "--node-count=$num_slices" "--node-prefix=$tpu")
    else
      args=(gcloud compute tpus tpu-vm create "$tpu" "${scope[@]}"
        "--accelerator-type=$accelerator" "--version=$version")
    fi
    if [[ $spot -eq 1 ]]; then
      args+=(--spot)
    fi
    gcloud_run "${args[@]}"
    ;;
  setup)
    [[ -n "$repo" ]] || fail "setup needs --repo (the git URL of your llamax)"
    printf -v clone '%q ' git clone "$repo" llamax
    printf -v checkout '%q ' git -C llamax checkout "$ref"
    remote="sudo apt-get update -q && sudo apt-get install -y -q python3.11 python3.11-venv git"
    remote+=" && cd ~ && { [ -d llamax ] || ${clone% }; } && ${checkout% } && cd llamax"
    remote+=" && python3.11 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]'"
    on_all_workers "$remote"
    ;;
  run)
    [[ ${#command[@]} -gt 0 ]] || fail "run needs a command after --"
    printf -v remote '%q ' "${command[@]}"
    on_all_workers "cd ~/llamax && ${remote% }"
    ;;
  delete)
    if [[ $num_slices -gt 1 ]]; then
      gcloud_run gcloud compute tpus queued-resources delete "$tpu" "${scope[@]}" --force --quiet
    else
      gcloud_run gcloud compute tpus tpu-vm delete "$tpu" "${scope[@]}" --quiet
    fi
    ;;
  *) fail "unknown action $action: expected create, setup, run or delete" ;;
esac
