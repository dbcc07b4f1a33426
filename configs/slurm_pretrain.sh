#!/bin/bash
# Multi-node pretraining under SLURM: one torchrun per node (srun, one task per node), c10d rendezvous on the job's
# first node. SLURM's SIGTERM (300 s before the time limit, or on preemption) reaches the training processes
# through torchrun, which waits about 30 s for them before SIGKILL: every rank stops at the next step boundary and
# writes a checkpoint (a large model may not finish it in time: then the previous checkpoint is the one resumed).
# A requeued or resubmitted job --auto-resumes from the newest checkpoint; --max-restarts restarts the workers of
# all nodes after one fails, and they resume the same way (tested with 2 torchrun "nodes" on one machine). Not run
# here under SLURM (no cluster): adapt the #SBATCH lines, GPUS_PER_NODE, the config and the paths to your cluster.
#SBATCH --job-name=mm-moe-pretrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@300
#SBATCH --requeue
#SBATCH --output=%x-%j.out
set -euo pipefail
GPUS_PER_NODE=8
# a rendezvous store per attempt: torchrun's shared one lets a restarted job read the previous attempt's keys and
# hang at start-up (pytorch/pytorch#135712)
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun --kill-on-bad-exit=1 torchrun --nnodes "$SLURM_NNODES" --nproc_per_node "$GPUS_PER_NODE" \
    --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$HEAD:29500" --max-restarts 2 \
    train_mm.py pretrain --config configs/pretrain_base_mhmoe.yaml pretrain_data.shards=/data/shards \
    run_dir=runs/pretrain_base_mhmoe train.distributed=ddp train.expert_parallel=true --auto-resume
