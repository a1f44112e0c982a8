#!/usr/bin/env bash
# The recipe of the shipped SmolLM2-135M-Instruct head, as run on one GPU (benchmarks/README.md).
# Self-distilled data from nothing (Magpie prompts written by the target, answered by the target),
# then Eagle3Trainer with training-time test. Each stage is resumable: rerun to continue.
#
#   bash benchmarks/train_smollm2_head.sh [RUN_DIR]
#
# Environment: GGUF (the GGUF file or a folder holding it, when it is not installed or cached),
# CONVERSATIONS (a conversations JSONL(.gz) to tokenise instead of synthesising new ones, e.g.
# benchmarks/data/smollm2_selfdistill/conversations.jsonl.gz), SYNTHESIZE, EPOCHS, BATCH, LR, EVAL_HOLDOUT (that
# many of the CONVERSATIONS kept out of training and evaluated after every epoch: accuracy per TTT step and simulated
# acceptance length on data the head has not seen), HEAD (a trained head to continue from, with its own draft
# vocabulary unless REMAP_VOCAB=1 switches it to the data's), PROMPT_OPENERS (a file of first words for
# synthesised prompts, e.g. benchmarks/data/smollm2_selfdistill/prompt_openers.txt), SEED, DRAFT_VOCAB (ids the
# head may propose, default 8192; 16384 keeps a shipped head under 30 MB).
set -euo pipefail
RUN_DIR=${1:-runs/smollm2}
SYNTHESIZE=${SYNTHESIZE:-5000}
EPOCHS=${EPOCHS:-3}
BATCH=${BATCH:-16}
LR=${LR:-3e-4}
BENCH=(python benchmarks/run_benchmark.py)
TARGET=(--target smollm2)
if [ -n "${GGUF:-}" ]; then TARGET+=(--gguf "$GGUF"); fi

EVAL_HOLDOUT=${EVAL_HOLDOUT:-0}
SEED=${SEED:-42}
DRAFT_VOCAB=${DRAFT_VOCAB:-8192}
openers=()
if [ -n "${PROMPT_OPENERS:-}" ]; then openers=(--prompt_openers "$PROMPT_OPENERS"); fi
prepare() {  # OUTPUT_DIR SOURCE_ARGS...
  local output_dir=$1
  shift
  "${BENCH[@]}" prepare-data "${TARGET[@]}" --output_dir "$output_dir" "$@" --max_new_tokens 512 \
    --batch_size 256 --draft_vocab_size "$DRAFT_VOCAB" --dtype bfloat16 --seed "$SEED"
}
if [ ! -f "$RUN_DIR/data/vocab_map.safetensors" ]; then
  if [ -n "${CONVERSATIONS:-}" ]; then
    conversations=$CONVERSATIONS
    if [ "$EVAL_HOLDOUT" -gt 0 ]; then
      mkdir -p "$RUN_DIR"
      # The last EVAL_HOLDOUT conversations are the evaluation set, the others the training set.
      gzip -cdf "$CONVERSATIONS" | head -n "-$EVAL_HOLDOUT" > "$RUN_DIR/train_conversations.jsonl"
      gzip -cdf "$CONVERSATIONS" | tail -n "$EVAL_HOLDOUT" > "$RUN_DIR/eval_conversations.jsonl"
      conversations=$RUN_DIR/train_conversations.jsonl
      prepare "$RUN_DIR/eval_data" --data "$RUN_DIR/eval_conversations.jsonl"
    fi
    prepare "$RUN_DIR/data" --data "$conversations"
  else
    prepare "$RUN_DIR/data" --synthesize "$SYNTHESIZE" "${openers[@]}"
  fi
fi
evaluation=()
if [ -d "$RUN_DIR/eval_data" ]; then evaluation=(--eval_data "$RUN_DIR/eval_data" --eval_strategy epoch); fi
start=()
if [ -n "${HEAD:-}" ]; then start=(--head "$HEAD"); fi
if [ -n "${REMAP_VOCAB:-}" ]; then start+=(--remap_vocab true); fi
resume=()
if compgen -G "$RUN_DIR/head/checkpoint-*" > /dev/null; then resume=(--resume_from_checkpoint latest); fi
"${BENCH[@]}" train "${TARGET[@]}" --data "$RUN_DIR/data" --output_dir "$RUN_DIR/head" --num_train_epochs "$EPOCHS" \
  --per_device_train_batch_size "$BATCH" --learning_rate "$LR" --lr_scheduler_type cosine --warmup_steps 0.03 \
  --max_grad_norm 0.5 --bf16 true --logging_steps 20 --save_steps 200 --save_total_limit 2 \
  --dataloader_num_workers 2 --report_to none "${evaluation[@]}" "${start[@]}" "${resume[@]}"
