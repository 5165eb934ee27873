#!/usr/bin/env bash
# Train on GPU nodes under SLURM: one llamax-train process per GPU, one JAX cluster.
#
#   sbatch --nodes=2 scripts/slurm_train.sh configs/llama2_7b.py /shared/runs/7b \
#       --config.mesh.fsdp=-1 --config.train.batch_size=256
#
# Each task learns its place from SLURM's variables (SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID,
# SLURM_STEP_NODELIST; llamax.cluster.launcher) and takes the GPU of its local rank; the
# coordinator is the first node, on port 20000 + job id % 10000 unless MASTER_PORT is set.
# The workdir must be one path every node sees (a shared filesystem or gs://). For one
# process per node driving all of its GPUs instead, submit with --ntasks-per-node=1.
#SBATCH --job-name=llamax
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --exclusive
set -euo pipefail

if [ "$#" -lt 2 ]; then
    echo "usage: sbatch [--nodes=N] $0 CONFIG WORKDIR [--config.KEY=VALUE ...]" >&2
    exit 2
fi
config=$1
workdir=$2
shift 2

# One process per GPU: each sees all of the node's GPUs and JAX keeps the one of its local
# rank (llamax passes it as local_device_ids), so do not narrow CUDA_VISIBLE_DEVICES per task.
srun --kill-on-bad-exit=1 llamax-train --config "$config" --workdir "$workdir" "$@"
