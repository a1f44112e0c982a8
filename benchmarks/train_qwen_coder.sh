#!/usr/bin/env bash
# A head for Qwen2.5-Coder-0.5B-Instruct (the `qwen-coder` offline target) trained from nothing with the documented
# commands (benchmarks/README.md, "Qwen2.5-Coder-0.5B-Instruct"): conversations written by the target itself (Magpie
# prompts begun with the first words of PROMPT_OPENERS, answered greedily), then Eagle3Trainer with training-time
# test and a held-out evaluation after every epoch. Two stages, each resumable:
#
#   bash benchmarks/train_qwen_coder.sh data  [RUN_DIR]   # synthesise, hold out EVAL_HOLDOUT, tokenise both parts
#   bash benchmarks/train_qwen_coder.sh train [RUN_DIR]   # train a new head (rerun to continue from a checkpoint)
#
# data: `prepare-data --synthesize SYNTHESIZE` writes RUN_DIR/synth/conversations.jsonl (prompts cut at their first
# blank line: this target goes on to answer its own request inside the user turn; answers of at most
# MAX_NEW_TOKENS tokens, generated GEN_BATCH at a time); a rerun skips it once that folder is complete. The last
# EVAL_HOLDOUT conversations are tokenised into RUN_DIR/eval_data, the others into RUN_DIR/data with a draft vocabulary
# of the DRAFT_VOCAB ids they use most (its coverage is printed). CONVERSATIONS (a conversations JSONL, .gz too)
# replaces the synthesis, e.g. one brought back from an earlier run.
# train: a new head whose MLP is HEAD_MLP wide (the target's is 4864), EPOCHS epochs at LR, BATCH rows per step,
# checkpoints every 200 steps; evaluated on RUN_DIR/eval_data after every epoch.
#
# Environment: GGUF (the GGUF file, its pieces in order or a folder holding it), SEED, BENCH (the command run as
# `BENCH prepare-data|train ...`, default `python benchmarks/run_benchmark.py`), the sizes above, and DATA_ARGS /
# TRAIN_ARGS: more options for every prepare-data / the train command, after the script's own (a later option wins),
# e.g. DATA_ARGS="--device cpu --dtype float32" TRAIN_ARGS="--use_cpu true --max_steps 2" for a trial on a CPU.
set -euo pipefail
STAGE=${1:?usage: train_qwen_coder.sh data|train [RUN_DIR]}
RUN_DIR=${2:-runs/qwen-coder}
SEED=${SEED:-42}
read -r -a BENCH <<< "${BENCH:-python benchmarks/run_benchmark.py}"
TARGET=(--target qwen-coder)
if [ -n "${GGUF:-}" ]; then read -r -a pieces <<< "$GGUF" && TARGET+=(--gguf "${pieces[@]}"); fi

if [ "$STAGE" = data ]; then
  EVAL_HOLDOUT=${EVAL_HOLDOUT:-256}
  DRAFT_VOCAB=${DRAFT_VOCAB:-8192}
  if [ "$EVAL_HOLDOUT" -lt 1 ]; then echo "EVAL_HOLDOUT must be at least 1: train evaluates on it." >&2 && exit 2; fi
  read -r -a data_args <<< "${DATA_ARGS:-}"
  conversations=${CONVERSATIONS:-$RUN_DIR/synth/conversations.jsonl}
  # prepare-data writes its summary last: without it the synthesis did not finish.
  if [ -z "${CONVERSATIONS:-}" ] && [ ! -f "$RUN_DIR/synth/prepare_data_summary.json" ]; then
    "${BENCH[@]}" prepare-data "${TARGET[@]}" --output_dir "$RUN_DIR/synth" --synthesize "${SYNTHESIZE:-10240}" \
      --prompt_openers "${PROMPT_OPENERS:-$(dirname "$0")/data/qwen_coder_selfdistill/prompt_openers.txt}" \
      --prompt_first_paragraph true \
      --max_new_tokens "${MAX_NEW_TOKENS:-512}" --batch_size "${GEN_BATCH:-2048}" --draft_vocab_size "$DRAFT_VOCAB" \
      --dtype bfloat16 --seed "$SEED" --num_proc 8 "${data_args[@]}"
  fi
  if [ ! -f "$RUN_DIR/data/vocab_map.safetensors" ]; then
    # The last EVAL_HOLDOUT conversations are the evaluation set, the others the training set.
    mkdir -p "$RUN_DIR"
    gzip -cdf "$conversations" | head -n "-$EVAL_HOLDOUT" > "$RUN_DIR/train_conversations.jsonl"
    gzip -cdf "$conversations" | tail -n "$EVAL_HOLDOUT" > "$RUN_DIR/eval_conversations.jsonl"
    for split in eval train; do
      output_dir=$RUN_DIR/data
      if [ "$split" = eval ]; then output_dir=$RUN_DIR/eval_data; fi
      "${BENCH[@]}" prepare-data "${TARGET[@]}" --data "$RUN_DIR/${split}_conversations.jsonl" \
        --output_dir "$output_dir" --draft_vocab_size "$DRAFT_VOCAB" --num_proc 8 "${data_args[@]}"
    done
  fi
elif [ "$STAGE" = train ]; then
  read -r -a train_args <<< "${TRAIN_ARGS:-}"
  resume=()
  if compgen -G "$RUN_DIR/head/checkpoint-*" > /dev/null; then resume=(--resume_from_checkpoint latest); fi
  "${BENCH[@]}" train "${TARGET[@]}" --data "$RUN_DIR/data" --eval_data "$RUN_DIR/eval_data" --eval_strategy epoch \
    --output_dir "$RUN_DIR/head" --head_intermediate_size "${HEAD_MLP:-768}" --num_train_epochs "${EPOCHS:-3}" \
    --per_device_train_batch_size "${BATCH:-16}" --learning_rate "${LR:-3e-4}" --lr_scheduler_type cosine \
    --warmup_steps 0.03 --max_grad_norm 0.5 --bf16 true --logging_steps 20 --save_steps 200 --save_total_limit 2 \
    --dataloader_num_workers 2 --report_to none "${resume[@]}" "${train_args[@]}"
else
  echo "Unknown stage $STAGE: use data or train." >&2
  exit 2
fi
