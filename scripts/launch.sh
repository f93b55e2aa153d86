#!/usr/bin/env bash
# Launch dpo-train on several processes with one of the shipped Accelerate configs.
#   scripts/launch.sh ENGINE CONFIG.yaml [section.key=value ...] [--resume auto]
# ENGINE: ddp | fsdp | zero2 | zero3 | zero3_offload (configs/accelerate/ENGINE.yaml).
# NUM_PROCESSES=4 sets the process count (default: the Accelerate config's on GPUs, 2 on a CPU machine);
# MAIN_PROCESS_PORT the rendezvous port (default 29500), for several runs on one machine;
# MIXED_PRECISION=bf16|fp16|no overrides the Accelerate config's (on a CPU machine the default is no).
# COMMAND=generate runs `dpo-train generate` (on-policy pairs, each process sampling its share) instead of training.
# On a machine without GPUs the same engine runs on CPU processes over gloo, in fp32: a rehearsal of the
# GPU run (engine, config, data, checkpoints, resume, export) before paying for GPU hours.
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,8p' "$0"
  exit 2
fi
engine=$1 config=$2
shift 2
accel="$(dirname "$0")/../configs/accelerate/$engine.yaml"
[ -f "$accel" ] || { echo "error: no engine '$engine': no Accelerate config $accel" >&2; exit 2; }
if python -c "import sys, torch; sys.exit(torch.accelerator.is_available())"; then
  # CPU rehearsal: DeepSpeed on its CPU accelerator, fp32 unless MIXED_PRECISION says otherwise
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  exec accelerate launch --config_file "$accel" --num_processes "${NUM_PROCESSES:-2}" --mixed_precision "${MIXED_PRECISION:-no}" \
    ${MAIN_PROCESS_PORT:+--main_process_port "$MAIN_PROCESS_PORT"} -m dpo_train ${COMMAND:-train} --config "$config" "$@"
fi
exec accelerate launch --config_file "$accel" ${NUM_PROCESSES:+--num_processes "$NUM_PROCESSES"} \
  ${MIXED_PRECISION:+--mixed_precision "$MIXED_PRECISION"} \
  ${MAIN_PROCESS_PORT:+--main_process_port "$MAIN_PROCESS_PORT"} -m dpo_train ${COMMAND:-train} --config "$config" "$@"
