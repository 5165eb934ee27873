#!/usr/bin/env bash
# Mount a Cloud Storage bucket with gcsfuse (on a TPU VM worker), for tfds datasets: llamax
# reads them as ArrayRecord files, whose reader opens local files only. Everything else
# llamax reads or writes (workdirs, checkpoints, tokenizers, corpus files) takes gs:// paths
# as they are.
#
#   scripts/mount_bucket.sh BUCKET DIR
#
# Installs gcsfuse from Google's apt repository when it is missing; does nothing when DIR is
# already a mount point. scripts/train.sh runs it on every worker for --tfds-data-dir gs://...
set -euo pipefail

if [[ $# -ne 2 || "$1" == gs://* || "$1" == -* ]]; then
  echo "usage: mount_bucket.sh BUCKET DIR (the bucket's name, without gs://)" >&2
  exit 2
fi
bucket="$1" dir="$2"
if mountpoint -q "$dir" 2>/dev/null; then
  exit 0
fi
if ! command -v gcsfuse >/dev/null; then
  release="$(lsb_release -c -s)"
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg |
    sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
  echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-$release main" |
    sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
  sudo apt-get update -q && sudo apt-get install -y -q gcsfuse
fi
mkdir -p "$dir"
gcsfuse --implicit-dirs "$bucket" "$dir"
