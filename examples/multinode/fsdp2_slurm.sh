#!/bin/bash
# LayerDropBack with FSDP2 sharding (ModelParallelStrategy + fully_shard) on 2 nodes x 8 GPUs under
# SLURM: ViT-L/16 fine-tuned on CIFAR-100 (fsdp2_vit_l16.yaml). One task per GPU, started by srun;
# Lightning's SLURMEnvironment (detected from SLURM_* variables) supplies the ranks, the world size
# and the main address, so no torchrun and no MASTER_ADDR are needed.
#
#   sbatch examples/multinode/fsdp2_slurm.sh      (from the repository root)
#
# Adjust the partition/account lines and the environment activation to your cluster. --nodes and
# --ntasks-per-node must match trainer.num_nodes and trainer.devices, and their product the strategy's
# data_parallel_size (all three set below on the command line, so that the config and the allocation
# cannot disagree).
#SBATCH --job-name=ldb-fsdp2
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8          # one process per GPU
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10           # DataLoader workers (num_workers: 8) plus the main thread
#SBATCH --mem=0                      # all of each node's memory
#SBATCH --time=24:00:00
#SBATCH --signal=SIGUSR1@120         # Lightning saves a checkpoint and requeues the job on SIGUSR1
#SBATCH --requeue
#SBATCH --output=%x-%j.out

set -euo pipefail

# source ~/venvs/ldb/bin/activate      # an environment with lightning-ldb[examples] on every node

export NCCL_DEBUG=WARN
# Keep a failed rank from leaving the others blocked in a collective until the 30-minute default.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1

CONFIG=examples/multinode/fsdp2_vit_l16.yaml
NUM_NODES=${SLURM_JOB_NUM_NODES}
DEVICES=${SLURM_NTASKS_PER_NODE}
# fsdp2_model.py (the sharded classifier the config names as fsdp2_model.ShardedFineTuneClassifier).
export PYTHONPATH="${SLURM_SUBMIT_DIR:-$PWD}/examples/multinode${PYTHONPATH:+:${PYTHONPATH}}"

# srun starts NUM_NODES x DEVICES copies of the command; each becomes one FSDP2 data-parallel rank.
# Lightning picks SLURMEnvironment(auto_requeue=True) by itself inside an sbatch job; on a requeue it
# restores its hpc checkpoint from default_root_dir (LDB's seed included, so the draws continue where
# they were), and the same command resumes the run.
srun --kill-on-bad-exit=1 ldb fit --config "${CONFIG}" \
    --trainer.num_nodes="${NUM_NODES}" \
    --trainer.devices="${DEVICES}" \
    --trainer.strategy.init_args.data_parallel_size="$((NUM_NODES * DEVICES))"
