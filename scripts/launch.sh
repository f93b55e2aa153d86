#!/usr/bin/env bash
# Launch dpo-train on several processes.
#   scripts/launch.sh ENGINE CONFIG.yaml [section.key=value ...] [--resume auto]
# ENGINE: ddp | fsdp | zero2 | zero3 | zero3_offload (accelerate launch with configs/accelerate/ENGINE.yaml),
#         or cpu (torchrun with gloo: accelerate launch runs CPU jobs on several processes only through MPI).
# NUM_PROCESSES=4 scripts/launch.sh ddp ...  sets the process count (cpu: default 2).
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,6p' "$0"
  exit 2
fi
engine=$1 config=$2
shift 2
if [ "$engine" = cpu ]; then
  exec env OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" torchrun --nproc_per_node "${NUM_PROCESSES:-2}" \
    -m dpo_train --config "$config" "$@"
fi
accel="$(dirname "$0")/../configs/accelerate/$engine.yaml"
[ -f "$accel" ] || { echo "error: no Accelerate config $accel" >&2; exit 2; }
exec accelerate launch --config_file "$accel" ${NUM_PROCESSES:+--num_processes "$NUM_PROCESSES"} \
  -m dpo_train --config "$config" "$@"
