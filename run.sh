#!/bin/sh
# Launch a training recipe with torchrun: one process per visible GPU (1 without a GPU).
#   sh run.sh [script] [train_args.json] [--key value ...]
# Several machines: set NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT on each (same values but NODE_RANK).
# Honours CUDA_VISIBLE_DEVICES and NPROC_PER_NODE.
set -eu
SCRIPT=${1:-train_sft.py}
CONFIG=${2:-config/lora_config.json}
[ $# -gt 0 ] && shift
[ $# -gt 0 ] && shift

if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$(python3 -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}

echo "run.sh: $SCRIPT $CONFIG on $NNODES node(s) x $NPROC_PER_NODE process(es)"
exec torchrun \
  --nnodes "$NNODES" --node_rank "$NODE_RANK" \
  --nproc_per_node "$NPROC_PER_NODE" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  "$SCRIPT" --train_args_file "$CONFIG" "$@"
