"""Run in the SpecForge venv, with SpecForge's draft class `LlamaForCausalLMEagle3`.

- `load HEAD_DIR TARGET_DIR INPUTS OUTPUT`: load a `specforge` export the way SpecForge's training loads a draft
  checkpoint (config read by `load_draft_config_source`, model built by `AutoDraftModel.from_config`, weights by
  `warm_start_draft_model`, embedding by `load_embedding`), and score the inputs as its training step 0 does.
  (Its `LlamaForCausalLMEagle3.from_pretrained` under transformers 5.8.1 leaves the rotary buffers uninitialised,
  whatever the checkpoint.)
- `write CONFIG_JSON SWITCHES_JSON TARGET_DIR INPUTS OUTPUT HEAD_DIR`: build a head from a config with the given
  switches (`norm_output`, `fc_norm`), random weights (norms too), save it with `save_pretrained`, and score the
  inputs.
"""

import json
import sys

import torch
from specforge.modeling.auto import AutoDraftModel
from specforge.modeling.draft.llama3_eagle import LlamaForCausalLMEagle3
from specforge.training.model_loading import load_draft_config_source, warm_start_draft_model
from transformers import LlamaConfig


def score(model, inputs):
    features, ids = inputs["target_hidden_states"], inputs["input_ids"]
    batch, length = ids.shape
    with torch.no_grad():
        hidden = model.project_hidden_states(features)
        mask = model.prepare_decoder_attention_mask(
            torch.ones(batch, length, dtype=torch.bool), hidden, batch, length, 0
        )
        out = model.backbone(
            input_embeds=model.embed_input_ids(ids).to(hidden.dtype),
            hidden_states=hidden,
            cache_hidden=[[], []],
            attention_mask=mask,
            position_ids=torch.arange(length)[None],
            past_key_values=None,
            use_cache=True,
        )
        return model.compute_logits(out)


mode = sys.argv[1]
if mode == "load":
    head_dir, target_dir, inputs_path, output_path = sys.argv[2:6]
    config = load_draft_config_source(head_dir)
    model = AutoDraftModel.from_config(config, attention_backend="sdpa", torch_dtype=torch.float32).eval()
    warm_start_draft_model(model, head_dir, draft_config=config, strategy="eagle3", allow_missing_embedding=True)
else:
    config_path, switches, target_dir, inputs_path, output_path, head_dir = sys.argv[2:8]
    with open(config_path) as file:
        config = LlamaConfig(**{**json.load(file), **json.loads(switches), "torch_dtype": "float32"})
    torch.manual_seed(0)
    model = LlamaForCausalLMEagle3(config).float().eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
        d2t = torch.load(inputs_path)["d2t"]
        model.d2t.copy_(d2t)
        model.t2d.zero_()
        model.t2d[torch.arange(len(d2t)) + d2t] = True
    model.save_pretrained(head_dir)
model.load_embedding(target_dir)
torch.save({"logits": score(model, torch.load(inputs_path))}, output_path)
