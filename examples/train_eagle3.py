"""Train an EAGLE-3 draft head for your own model. Adapt the four numbered parts.

    python examples/train_eagle3.py                       # one GPU
    accelerate launch examples/train_eagle3.py            # several GPUs (DDP)

`hf-eagle3 prepare-data` + `hf-eagle3 train` do the same from the command line.
"""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_eagle3 import Eagle3Config, Eagle3DraftModel, Eagle3Trainer, Eagle3TrainingArguments
from hf_eagle3.data import build_vocab_maps, tokenize_conversations

# 1. The target: the model the head will speed up. It stays frozen; bfloat16 is enough.
target_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
tokenizer = AutoTokenizer.from_pretrained(target_id)
target = AutoModelForCausalLM.from_pretrained(target_id, dtype=torch.bfloat16)

# 2. The data: conversations the head learns from, ideally answered by the target itself (see
#    `hf-eagle3 prepare-data --regenerate` / `--synthesize`). The loss mask covers the assistant's tokens.
conversations = [
    [
        {"role": "user", "content": "What is speculative decoding?"},
        {"role": "assistant", "content": "A small model drafts tokens and the large model verifies them at once."},
    ],
    # ... tens of thousands more
]
dataset, _ = tokenize_conversations(tokenizer, conversations, max_length=2048)

# 3. The head: one decoder layer shaped like the target's, predicting over the 8192 most frequent
#    assistant tokens (a smaller lm_head drafts faster; coverage tells what share of tokens it can propose).
d2t, t2d, coverage = build_vocab_maps(
    dataset, draft_vocab_size=min(8192, target.config.vocab_size), vocab_size=target.config.vocab_size
)
print(f"draft vocabulary covers {coverage:.1%} of the training tokens")
config = Eagle3Config.from_target_config(target.config, draft_vocab_size=len(d2t))
draft = Eagle3DraftModel(config)
draft.d2t.copy_(d2t)
draft.t2d.copy_(t2d)
draft.attach_target(target)

# 4. Training-time test: the head is unrolled on its own outputs for `ttt_steps` steps.
args = Eagle3TrainingArguments(
    output_dir="smollm2-eagle3",
    num_train_epochs=3,
    per_device_train_batch_size=8,
    bf16=torch.cuda.is_available(),
    logging_steps=10,
    ttt_steps=7,
)
trainer = Eagle3Trainer(model=draft, target_model=target, args=args, train_dataset=dataset)
trainer.train()
trainer.save_model()  # a complete head: Eagle3DraftModel.from_pretrained("smollm2-eagle3")

# Use it: target.generate(**inputs, assistant_model=draft)
