#!/usr/bin/env bash
# Long-prompt conversations and chat answered at temperature 1 for the SmolLM2-135M-Instruct head, then the head
# fine-tuned on them and on greedy chat together (benchmarks/README.md, "Long prompts"). Three stages, each resumable:
#
#   bash benchmarks/train_smollm2_long.sh data    [RUN_DIR]   # documents, requests over them, the target's answers
#   bash benchmarks/train_smollm2_long.sh sampled [RUN_DIR]   # chat prompts answered again, sampled at T=1
#   bash benchmarks/train_smollm2_long.sh train   [RUN_DIR]   # mix with greedy chat, fine-tune (rerun to continue)
#
# data: prepare-data over the standard library's modules, its Language Reference topics and the installed packages'
# descriptions (DOCUMENTS), plus WRITE_DOCS documents the target writes itself; LONG conversations, answered greedily
# in batches of GEN_BATCH; RUN_DIR/long_data/conversations.jsonl is the result (and long_prompts.jsonl where each
# document came from, under which license).
# sampled: the first SAMPLED conversations of SAMPLE_FROM (default the shipped openers set) answered again by the
# target sampling at temperature 1, so that the head also learns from the contexts sampling decodes in (greedy
# self-distillation never shows it a sampled token); RUN_DIR/sampled_data/conversations.jsonl. It can run beside
# `data` on one GPU: both are bound by the host's kernel launches.
# train: LONG_CONVERSATIONS (default that file; a .jsonl.gz works too) and SAMPLED_CONVERSATIONS (default the
# sampled stage's file, if it exists) mixed with CHAT_PER_LONG greedy chat conversations per long one drawn from CHAT
# (default the shipped self-distilled sets), EVAL_HOLDOUT of each kind kept out and evaluated after every epoch, then
# HEAD (default the shipped head, its draft vocabulary kept unless REMAP_VOCAB=1) trained EPOCHS more epochs at LR.
# The shipped head is itself the result of this recipe (benchmarks/README.md, "The long-prompt head"): to make it
# again, pass as HEAD the chat head it started from, the package's head at commit 98d65f3.
#
# Environment: GGUF (the GGUF file, its pieces or a folder holding it), SEED, DRAFT_VOCAB (for the data's own
# vocabulary map, default 16384 as the shipped head), BATCH (training rows per step), BENCH (the command run as
# `BENCH prepare-data|train ...`, default `python benchmarks/run_benchmark.py`).
set -euo pipefail
STAGE=${1:?usage: train_smollm2_long.sh data|sampled|train [RUN_DIR]}
RUN_DIR=${2:-runs/smollm2-long}
SEED=${SEED:-42}
DRAFT_VOCAB=${DRAFT_VOCAB:-16384}
read -r -a BENCH <<< "${BENCH:-python benchmarks/run_benchmark.py}"
TARGET=(--target smollm2)
if [ -n "${GGUF:-}" ]; then read -r -a pieces <<< "$GGUF" && TARGET+=(--gguf "${pieces[@]}"); fi
DATA_DIR=$(dirname "$0")/data/smollm2_selfdistill

if [ "$STAGE" = data ]; then
  read -r -a sources <<< "${DOCUMENTS:-stdlib pydoc packages}"
  if [ ! -f "$RUN_DIR/long_data/vocab_map.safetensors" ]; then
    "${BENCH[@]}" prepare-data "${TARGET[@]}" --output_dir "$RUN_DIR/long_data" --documents "${sources[@]}" \
      --synthesize_documents "${WRITE_DOCS:-800}" --long_conversations "${LONG:-3000}" \
      --max_document_tokens 1024 --min_document_tokens 256 --max_document_chunks 4 --document_max_new_tokens 1024 \
      --max_new_tokens 512 --batch_size "${GEN_BATCH:-512}" --draft_vocab_size "$DRAFT_VOCAB" --dtype bfloat16 \
      --seed "$SEED" --num_proc 8
  fi
elif [ "$STAGE" = sampled ]; then
  if [ ! -f "$RUN_DIR/sampled_data/vocab_map.safetensors" ]; then
    "${BENCH[@]}" prepare-data "${TARGET[@]}" --output_dir "$RUN_DIR/sampled_data" \
      --data "${SAMPLE_FROM:-$DATA_DIR/conversations_openers_12k5_seed11.jsonl.gz}" --max_samples "${SAMPLED:-3000}" \
      --regenerate --temperature 1 --max_new_tokens 512 --batch_size "${GEN_BATCH:-512}" \
      --draft_vocab_size "$DRAFT_VOCAB" --dtype bfloat16 --seed "$SEED" --num_proc 8
  fi
elif [ "$STAGE" = train ]; then
  LONG_CONVERSATIONS=${LONG_CONVERSATIONS:-$RUN_DIR/long_data/conversations.jsonl}
  if [ -z "${SAMPLED_CONVERSATIONS+set}" ]; then
    SAMPLED_CONVERSATIONS=$RUN_DIR/sampled_data/conversations.jsonl
    if [ ! -f "$SAMPLED_CONVERSATIONS" ]; then SAMPLED_CONVERSATIONS=""; fi
  fi
  CHAT=${CHAT:-"$DATA_DIR/conversations.jsonl.gz $DATA_DIR/conversations_15k_seed7.jsonl.gz $DATA_DIR/conversations_openers_12k5_seed11.jsonl.gz"}
  EVAL_HOLDOUT=${EVAL_HOLDOUT:-200}
  read -r -a chat_files <<< "$CHAT"
  if [ ! -f "$RUN_DIR/data/vocab_map.safetensors" ]; then
    mkdir -p "$RUN_DIR"
    # CHAT_PER_LONG chat conversations per long one, drawn with SEED from those whose prompt no sampled conversation
    # answers; EVAL_HOLDOUT of each kind held out.
    python - "$RUN_DIR" "$SEED" "${CHAT_PER_LONG:-3}" "$EVAL_HOLDOUT" "$LONG_CONVERSATIONS" "$SAMPLED_CONVERSATIONS" \
      "${chat_files[@]}" <<'PY'
import gzip, json, random, sys
run_dir, seed, per_long, holdout, long_file, sampled_file, *chat_files = sys.argv[1:]
def lines(path):
    with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as file:
        return [line for line in file if line.strip()]
def prompt(line):
    return next(m["content"] for m in json.loads(line)["messages"] if m["role"] == "user")
rng = random.Random(int(seed))
long = lines(long_file)
sampled = lines(sampled_file) if sampled_file else []
answered = {prompt(line) for line in sampled}
chat = [line for path in chat_files for line in lines(path) if prompt(line) not in answered]
chat = rng.sample(chat, min(len(chat), int(per_long) * len(long)))
rng.shuffle(long)
rng.shuffle(sampled)
holdout = int(holdout)
kinds = [rows for rows in (chat, sampled, long) if rows]
train = [row for rows in kinds for row in rows[holdout:]]
evaluation = [row for rows in kinds for row in rows[:holdout]]
rng.shuffle(train)
for name, rows in (("train", train), ("eval", evaluation)):
    with open(f"{run_dir}/{name}_conversations.jsonl", "w", encoding="utf-8") as file:
        file.writelines(rows)
print(
    f"Training on {len(train)} conversations: {len(chat)} greedy chat, {len(sampled)} sampled chat and {len(long)} "
    f"long-prompt ones, {holdout} of each kind held out."
)
PY
    for split in eval train; do
      output_dir=$RUN_DIR/data
      if [ "$split" = eval ]; then output_dir=$RUN_DIR/eval_data; fi
      "${BENCH[@]}" prepare-data "${TARGET[@]}" --data "$RUN_DIR/${split}_conversations.jsonl" \
        --output_dir "$output_dir" --draft_vocab_size "$DRAFT_VOCAB" --num_proc 8
    done
  fi
  start=(--head "${HEAD:-src/hf_eagle3/heads/smollm2-135m-instruct}")
  if [ -n "${REMAP_VOCAB:-}" ]; then start+=(--remap_vocab true); fi
  resume=()
  if compgen -G "$RUN_DIR/head/checkpoint-*" > /dev/null; then resume=(--resume_from_checkpoint latest); fi
  "${BENCH[@]}" train "${TARGET[@]}" --data "$RUN_DIR/data" --eval_data "$RUN_DIR/eval_data" --eval_strategy epoch \
    --output_dir "$RUN_DIR/head" --num_train_epochs "${EPOCHS:-2}" --per_device_train_batch_size "${BATCH:-16}" \
    --learning_rate "${LR:-2e-4}" --lr_scheduler_type cosine --warmup_steps 0.03 --max_grad_norm 0.5 --bf16 true \
    --logging_steps 20 --save_steps 200 --save_total_limit 2 --dataloader_num_workers 2 --report_to none \
    "${start[@]}" "${resume[@]}"
else
  echo "Unknown stage $STAGE: use data, sampled or train." >&2
  exit 2
fi
