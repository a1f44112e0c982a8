"""Run in the official EAGLE venv: load an `eagle3` export with `EaModel.from_pretrained` and score the inputs.

Usage: python peer_eagle.py EAGLE_SRC TARGET_DIR HEAD_DIR INPUTS OUTPUT
"""

import sys

import torch

eagle_src, target_dir, head_dir, inputs_path, output_path = sys.argv[1:6]
sys.path.insert(0, eagle_src)
from eagle.model.ea_model import EaModel  # noqa: E402

model = EaModel.from_pretrained(
    base_model_path=target_dir, ea_model_path=head_dir, total_token=60, depth=7, top_k=10, torch_dtype=torch.float32
)
layer = model.ea_layer.eval()
inputs = torch.load(inputs_path)
with torch.no_grad():
    hidden = layer(inputs["target_hidden_states"], input_ids=inputs["input_ids"])
    logits = layer.lm_head(layer.norm(hidden))
torch.save({"logits": logits}, output_path)
