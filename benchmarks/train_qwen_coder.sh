#!/usr/bin/env bash
# A head for Qwen2.5-Coder-0.5B-Instruct (the `qwen-coder` offline target) trained from nothing with the documented
# commands (benchmarks/README.md, "Qwen2.5-Coder-0.5B-Instruct"): conversations written by the target itself (Magpie
# prompts begun with the first words of PROMPT_OPENERS, answered greedily), then Eagle3Trainer with training-time
# test and a held-out evaluation after every epoch. Two stages, each resumable:
#
#   bash benchmarks/train_qwen_coder.sh data  [RUN_DIR]   # synthesise, hold out EVAL_HOLDOUT, tokenise: one call
#   bash benchmarks/train_qwen_coder.sh train [RUN_DIR]   # train a new head (rerun to continue from a checkpoint)
#
# data: one `prepare-data --synthesize SYNTHESIZE --eval_size EVAL_HOLDOUT` call (the target is loaded once) writes
# RUN_DIR/data: the conversations the target wrote (conversations.jsonl; prompts cut at their first blank line: this
# target goes on to answer its own request inside the user turn; answers of at most MAX_NEW_TOKENS tokens, generated
# GEN_BATCH at a time), EVAL_HOLDOUT of them drawn with SEED and tokenised into RUN_DIR/data/eval, the others into
# RUN_DIR/data with a draft vocabulary of the DRAFT_VOCAB ids they use most (its coverage of both parts is printed).
# A rerun does nothing once the folder is complete, and only tokenises (the same split) when the synthesis finished
# but the tokenising did not. CONVERSATIONS (conversations JSONL files, .gz too, e.g. ones brought back from earlier
# runs; several are read in order) replace the synthesis; with SYNTHESIZE set too, SYNTHESIZE new ones are added to
# them (prompts they hold are not written again; give another SEED than their runs').
# train: a new head whose MLP is HEAD_MLP wide (the target's is 4864), EPOCHS epochs at LR, BATCH rows per step,
# checkpoints every 200 steps; evaluated on RUN_DIR/data/eval after every epoch.
#
# Environment: GGUF (the GGUF file, its pieces in order or a folder holding it), SEED, BENCH (the command run as
# `BENCH prepare-data|train ...`, default `python benchmarks/run_benchmark.py`), the sizes above, and DATA_ARGS /
# TRAIN_ARGS: more options for the prepare-data / train command, after the script's own (a later option wins),
# e.g. DATA_ARGS="--device cpu --dtype float32" TRAIN_ARGS="--use_cpu true --max_steps 2" for a trial on a CPU.
set -euo pipefail
STAGE=${1:?usage: train_qwen_coder.sh data|train [RUN_DIR]}
RUN_DIR=${2:-runs/qwen-coder}
SEED=${SEED:-42}
read -r -a BENCH <<< "${BENCH:-python benchmarks/run_benchmark.py}"
TARGET=(--target qwen-coder)
if [ -n "${GGUF:-}" ]; then read -r -a pieces <<< "$GGUF" && TARGET+=(--gguf "${pieces[@]}"); fi

if [ "$STAGE" = data ]; then
  read -r -a data_args <<< "${DATA_ARGS:-}"
  read -r -a conversations <<< "${CONVERSATIONS:-}"
  # prepare-data writes its summary last: without it the folder is not complete.
  if [ ! -f "$RUN_DIR/data/prepare_data_summary.json" ]; then
    if [ -f "$RUN_DIR/data/conversations.jsonl" ]; then
      texts=(--data "$RUN_DIR/data/conversations.jsonl")  # generated (written once complete), not yet tokenised
    elif [ -n "${CONVERSATIONS:-}" ] && [ -z "${SYNTHESIZE:-}" ]; then
      texts=(--data "${conversations[@]}")
    else
      texts=(--synthesize "${SYNTHESIZE:-10240}" --prompt_first_paragraph true
        --prompt_openers "${PROMPT_OPENERS:-$(dirname "$0")/data/qwen_coder_selfdistill/prompt_openers.txt}"
        --max_new_tokens "${MAX_NEW_TOKENS:-512}" --batch_size "${GEN_BATCH:-2048}" --dtype bfloat16
        ${CONVERSATIONS:+--data "${conversations[@]}"})
    fi
    "${BENCH[@]}" prepare-data "${TARGET[@]}" "${texts[@]}" --output_dir "$RUN_DIR/data" \
      --eval_size "${EVAL_HOLDOUT:-256}" --draft_vocab_size "${DRAFT_VOCAB:-8192}" --seed "$SEED" --num_proc 8 \
      "${data_args[@]}"
  fi
elif [ "$STAGE" = train ]; then
  read -r -a train_args <<< "${TRAIN_ARGS:-}"
  resume=()
  if compgen -G "$RUN_DIR/head/checkpoint-*" > /dev/null; then resume=(--resume_from_checkpoint latest); fi
  "${BENCH[@]}" train "${TARGET[@]}" --data "$RUN_DIR/data" --eval_data "$RUN_DIR/data/eval" --eval_strategy epoch \
    --output_dir "$RUN_DIR/head" --head_intermediate_size "${HEAD_MLP:-768}" --num_train_epochs "${EPOCHS:-4}" \
    --per_device_train_batch_size "${BATCH:-16}" --learning_rate "${LR:-3e-4}" --lr_scheduler_type cosine \
    --warmup_steps 0.03 --max_grad_norm 0.5 --bf16 true --logging_steps 20 --save_steps 200 --save_total_limit 2 \
    --dataloader_num_workers 2 --report_to none "${resume[@]}" "${train_args[@]}"
else
  echo "Unknown stage $STAGE: use data or train." >&2
  exit 2
fi
