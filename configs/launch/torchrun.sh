#!/usr/bin/env bash
# Multi-node launch with torchrun (c10d rendezvous), for clusters without SLURM or inside containers.
# Run the SAME command on every node; torchrun starts NPROC_PER_NODE processes per node and Lightning
# detects them (TorchElasticEnvironment) instead of spawning its own:
#
#   NNODES=2 NPROC_PER_NODE=8 RDZV_ENDPOINT=node001:29500 RUN_ID=inverse-1 \
#       configs/launch/torchrun.sh --config configs/qwen2_5_vl_3b/inverse_dynamics.yaml \
#       --config configs/trainer/deepspeed_zero2.yaml --config configs/trainer/bf16.yaml
#
# Every argument goes to `python -m latent_mca fit`; --trainer.num_nodes / --trainer.devices are appended
# from NNODES / NPROC_PER_NODE, because Lightning requires num_nodes x devices == torchrun's WORLD_SIZE.
#
# Environment:
#   NNODES          number of nodes (default 1)
#   NPROC_PER_NODE  processes (GPUs) per node (default: the number of GPUs nvidia-smi lists)
#   RDZV_ENDPOINT   host:port reachable from every node, usually the first node (required when NNODES > 1;
#                   default localhost:29500 on one node)
#   RUN_ID          rendezvous id, the same on all nodes and unique per job (default latent_mca)
#   PYTHON          interpreter (default python); `python -m torch.distributed.run` is torchrun itself
# Restarts are off (--max-restarts=0): on a failure rerun with --ckpt_path pointing at the last checkpoint.
set -euo pipefail

NNODES="${NNODES:-1}"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE="$(nvidia-smi --list-gpus 2>/dev/null | wc -l)"
    if [[ "$NPROC_PER_NODE" -eq 0 ]]; then
        echo "torchrun.sh: no GPU found; set NPROC_PER_NODE" >&2
        exit 2
    fi
fi
if [[ "$NNODES" -gt 1 && -z "${RDZV_ENDPOINT:-}" ]]; then
    echo "torchrun.sh: set RDZV_ENDPOINT=host:port of the first node (the same on every node)" >&2
    exit 2
fi
export TOKENIZERS_PARALLELISM=false

exec "${PYTHON:-python}" -m torch.distributed.run \
    --nnodes="$NNODES" \
    --nproc-per-node="$NPROC_PER_NODE" \
    --rdzv-backend=c10d \
    --rdzv-endpoint="${RDZV_ENDPOINT:-localhost:29500}" \
    --rdzv-id="${RUN_ID:-latent_mca}" \
    --max-restarts=0 \
    -m latent_mca fit "$@" \
    --trainer.num_nodes="$NNODES" \
    --trainer.devices="$NPROC_PER_NODE"
