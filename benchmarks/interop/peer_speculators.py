"""Run in the speculators venv: load a `speculators` export with `SpeculatorModel.from_pretrained` and score the
inputs (the first training-time-test step of its forward; logits read from its `lm_head`).

Usage: python peer_speculators.py HEAD_DIR INPUTS OUTPUT
"""

import sys

import torch
from speculators import SpeculatorModel

head_dir, inputs_path, output_path = sys.argv[1:4]
model = SpeculatorModel.from_pretrained(head_dir, dtype=torch.float32).eval()
inputs = torch.load(inputs_path)
captured = []
model.lm_head.register_forward_hook(lambda module, args, output: captured.append(output))
ids = inputs["input_ids"]
with torch.no_grad():
    model(
        hidden_states=inputs["target_hidden_states"],
        input_ids=ids,
        document_ids=torch.zeros_like(ids),
        position_ids=torch.arange(ids.shape[1])[None],
        ttt_steps=1,
    )
embedding_loaded = bool(torch.isfinite(model.embed_tokens.weight).all() and model.embed_tokens.weight.abs().sum() > 0)
torch.save({"logits": captured[0], "embedding_loaded": embedding_loaded}, output_path)
