#!/usr/bin/env bash
# The recipe of the shipped SmolLM2-135M-Instruct head, as run on one H100 (benchmarks/README.md).
# Self-distilled data from nothing (Magpie prompts written by the target, answered by the target),
# then Eagle3Trainer with training-time test. Each stage is resumable: rerun to continue.
#
#   bash benchmarks/train_smollm2_head.sh [RUN_DIR]
#
# Environment: GGUF (the GGUF file or a folder holding it, when it is not installed or cached),
# CONVERSATIONS (a conversations JSONL(.gz) to tokenise instead of synthesising new ones, e.g.
# benchmarks/data/smollm2_selfdistill/conversations.jsonl.gz), SYNTHESIZE, EPOCHS, BATCH, LR.
set -euo pipefail
RUN_DIR=${1:-runs/smollm2}
SYNTHESIZE=${SYNTHESIZE:-5000}
EPOCHS=${EPOCHS:-3}
BATCH=${BATCH:-16}
LR=${LR:-3e-4}
BENCH=(python benchmarks/run_benchmark.py)
TARGET=(--target smollm2)
if [ -n "${GGUF:-}" ]; then TARGET+=(--gguf "$GGUF"); fi

if [ ! -f "$RUN_DIR/data/vocab_map.safetensors" ]; then
  if [ -n "${CONVERSATIONS:-}" ]; then source_args=(--data "$CONVERSATIONS"); else source_args=(--synthesize "$SYNTHESIZE"); fi
  "${BENCH[@]}" prepare-data "${TARGET[@]}" --output_dir "$RUN_DIR/data" "${source_args[@]}" --max_new_tokens 512 \
    --batch_size 256 --draft_vocab_size 8192 --dtype bfloat16
fi
resume=()
if compgen -G "$RUN_DIR/head/checkpoint-*" > /dev/null; then resume=(--resume_from_checkpoint latest); fi
"${BENCH[@]}" train "${TARGET[@]}" --data "$RUN_DIR/data" --output_dir "$RUN_DIR/head" --num_train_epochs "$EPOCHS" \
  --per_device_train_batch_size "$BATCH" --learning_rate "$LR" --lr_scheduler_type cosine --warmup_steps 0.03 \
  --max_grad_norm 0.5 --bf16 true --logging_steps 20 --save_steps 200 --save_total_limit 2 \
  --dataloader_num_workers 2 --report_to none "${resume[@]}"
