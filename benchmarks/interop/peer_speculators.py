"""Run in the speculators venv, with speculators' own EAGLE-3 classes.

- `load HEAD_DIR INPUTS OUTPUT`: load an export with `SpeculatorModel.from_pretrained` and score the inputs.
- `write CONFIG_JSON SWITCHES_JSON INPUTS OUTPUT HEAD_DIR`: build speculators' `Eagle3DraftModel` from a config with
  the given norm switches, random weights (norms too), the verifier's embedding loaded by speculators itself, save
  it with `save_pretrained`, and score the inputs.

Scoring runs two training-time-test steps of speculators' forward and keeps the logits of each (read from its
`lm_head`): step 1 feeds the head's own output back, which is where `norm_output` acts.
"""

import json
import sys

import torch
from speculators import SpeculatorModel
from speculators.models.eagle3 import Eagle3DraftModel, Eagle3SpeculatorConfig

# speculators' default, flex attention, extends its block mask for the second TTT step only for lengths that are a
# multiple of its block size on the CPU; its eager path builds the same masks densely.
ATTENTION = "eager"


def score(model, inputs) -> list[torch.Tensor]:
    captured = []
    handle = model.lm_head.register_forward_hook(lambda module, args, output: captured.append(output))
    ids = inputs["input_ids"]
    with torch.no_grad():
        model(
            hidden_states=inputs["target_hidden_states"],
            input_ids=ids,
            document_ids=torch.zeros_like(ids),
            position_ids=torch.arange(ids.shape[1])[None],
            ttt_steps=2,
        )
    handle.remove()
    return captured


mode = sys.argv[1]
if mode == "load":
    head_dir, inputs_path, output_path = sys.argv[2:5]
    config = Eagle3SpeculatorConfig.from_pretrained(head_dir)
    config.transformer_layer_config._attn_implementation = ATTENTION
    model = SpeculatorModel.from_pretrained(head_dir, config=config, dtype=torch.float32).eval()
else:
    config_path, switches, inputs_path, output_path, head_dir = sys.argv[2:7]
    with open(config_path) as file:
        values = {**json.load(file), **json.loads(switches)}
    config = Eagle3SpeculatorConfig(**{key: value for key, value in values.items() if key != "architectures"})
    config.transformer_layer_config._attn_implementation = ATTENTION
    torch.manual_seed(0)
    model = Eagle3DraftModel(config).float().eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name and not name.startswith("verifier_"):
                parameter.uniform_(0.5, 1.5)
        d2t = torch.load(inputs_path)["d2t"]
        model.load_vocab_mappings(
            torch.zeros(config.transformer_layer_config.vocab_size, dtype=torch.bool).index_fill_(
                0, torch.arange(len(d2t)) + d2t, True
            ),
            d2t,
        )
    model.load_verifier_weights()
    model.save_pretrained(head_dir)
embedding = model.embed_tokens.weight
embedding_loaded = bool(torch.isfinite(embedding).all() and embedding.abs().sum() > 0)
torch.save({"logits": score(model, torch.load(inputs_path)), "embedding_loaded": embedding_loaded}, output_path)
