#!/usr/bin/env bash
# Multi-GPU training through `accelerate launch`: DDP, then FSDP2, for a fixed number of steps each; then
# samples/s and tokens/s (the Trainer's own metrics), peak GPU memory per process, and every saved head loaded
# back (a short run per mode is also resumed from its checkpoint). Offline; see benchmarks/README.md.
#
#   bash benchmarks/train_multi_gpu.sh TARGET DATA [RUN_DIR]
#
# TARGET: a model folder or .gguf file, or a registered offline target (smollm2, qwen-coder) materialised with
# GGUF (its file, pieces or folder, as `run_benchmark.py materialize --gguf` takes them) when not cached.
# DATA: anything `hf-eagle3 train --data` takes (a `prepare-data` folder brings its draft vocabulary).
# Environment: NUM_GPUS (2), STEPS (100), BATCH (per GPU, 8), MAX_LENGTH (2048), MODES ("ddp fsdp"; add fsdp1
# for FSDP1), EXTRA (more `hf-eagle3 train` flags), PYTHON (python3).
set -euo pipefail
TARGET=$1
DATA=$2
RUN_DIR=${3:-runs/multi_gpu}
NUM_GPUS=${NUM_GPUS:-2}
STEPS=${STEPS:-100}
BATCH=${BATCH:-8}
MAX_LENGTH=${MAX_LENGTH:-2048}
MODES=${MODES:-ddp fsdp}
PYTHON=${PYTHON:-python3}
HERE=$(dirname "$0")

if [ ! -e "$TARGET" ]; then
  materialize=("$PYTHON" "$HERE/run_benchmark.py" materialize --target "$TARGET")
  if [ -n "${GGUF:-}" ]; then read -ra pieces <<< "$GGUF"; materialize+=(--gguf "${pieces[@]}"); fi
  TARGET=$("${materialize[@]}" | tail -n 1)
fi

launch_flags() {  # MODE: sets `flags`, the `accelerate launch` options of that mode
  flags=(--num_processes "$NUM_GPUS" --num_machines 1 --mixed_precision bf16 --dynamo_backend no)
  case $1 in
    ddp) flags+=(--multi_gpu) ;;
    fsdp) flags+=(--use_fsdp --fsdp_version 2 --fsdp_reshard_after_forward true --fsdp_state_dict_type FULL_STATE_DICT
                  --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP --fsdp_transformer_layer_cls_to_wrap Eagle3DecoderLayer) ;;
    fsdp1) flags+=(--use_fsdp --fsdp_version 1 --fsdp_sharding_strategy FULL_SHARD --fsdp_use_orig_params true
                   --fsdp_state_dict_type FULL_STATE_DICT --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP
                   --fsdp_transformer_layer_cls_to_wrap Eagle3DecoderLayer) ;;
    *) echo "unknown mode $1 (ddp, fsdp, fsdp1)" >&2; exit 2 ;;
  esac
}

train() {  # MODE OUTPUT_DIR TRAIN_FLAGS...
  local output_dir=$2
  launch_flags "$1"
  shift 2
  # EXTRA is split into words, the other options are not.
  local command=("$PYTHON" -m accelerate.commands.launch "${flags[@]}" "$HERE/train_multi_gpu.py" train
                 --target "$TARGET" --data "$DATA" --output_dir "$output_dir" --per_device_train_batch_size "$BATCH"
                 --max_length "$MAX_LENGTH" --bf16 true --report_to none --disable_tqdm true --seed 0 "$@" ${EXTRA:-})
  echo "+ ${command[*]}"
  "${command[@]}" > "$output_dir.log" 2>&1 || { tail -n 60 "$output_dir.log"; exit 1; }
}

mkdir -p "$RUN_DIR"
for mode in $MODES; do
  rm -rf "${RUN_DIR:?}/$mode" "$RUN_DIR/$mode-short" "$RUN_DIR/$mode-resumed"
  start=$SECONDS
  train "$mode" "$RUN_DIR/$mode" --max_steps "$STEPS" --save_strategy no --logging_steps 10 --logging_first_step true \
    --include_num_input_tokens_seen non_padding
  # Checkpoints: 4 steps saving at 2, then the same 4 steps resumed from that checkpoint in a fresh folder.
  train "$mode" "$RUN_DIR/$mode-short" --max_steps 4 --save_steps 2 --logging_steps 1
  mkdir -p "$RUN_DIR/$mode-resumed" && cp -r "$RUN_DIR/$mode-short/checkpoint-2" "$RUN_DIR/$mode-resumed/"
  train "$mode" "$RUN_DIR/$mode-resumed" --max_steps 4 --save_steps 2 --logging_steps 1 --resume_from_checkpoint latest
  echo "$mode: $((SECONDS - start)) s for the three runs"
done
"$PYTHON" "$HERE/train_multi_gpu.py" report "$RUN_DIR" $MODES
