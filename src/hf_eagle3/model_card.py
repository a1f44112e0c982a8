"""The model card published with a draft head: what it drafts for, how to run it, how well it drafts."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from .checkpoint_formats import NATIVE_LAYOUT, SPECFORGE_LAYOUT, SPECULATORS_LAYOUT, checkpoint_layout
from .configuration_eagle3 import Eagle3Config

# Shipped inside the package (a link to the repository's model_cards/ folder) so installed copies find it.
TEMPLATE_PATH = Path(__file__).parent / "model_cards" / "eagle3_head.md"

FORMAT_TITLES = {
    NATIVE_LAYOUT: "hf-eagle3 (transformers)",
    "eagle3": "official EAGLE-3",
    SPECFORGE_LAYOUT: "SpecForge / SGLang (`LlamaForCausalLMEagle3`)",
    SPECULATORS_LAYOUT: "speculators / vLLM (`Eagle3Speculator`)",
}
FORMAT_TAGS = {
    NATIVE_LAYOUT: [],
    "eagle3": [],
    SPECFORGE_LAYOUT: ["sglang", "specforge"],
    SPECULATORS_LAYOUT: ["vllm", "speculators"],
}


def _hub_model_id(name: str | None) -> str | None:
    """`name` if it is a hub repo id; a local path (e.g. a GGUF target's directory) is not a `base_model`."""
    if not name or name.startswith((".", "/", "~")):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def create_model_card(
    config: Eagle3Config,
    repo_id: str | None = None,
    format: str = NATIVE_LAYOUT,
    *,
    base_model: str | None = None,
    training_data: str | None = None,
    datasets: list[str] | None = None,
    acceptance: dict[str, float] | None = None,
    license: str | None = None,
    tags: list[str] | None = None,
) -> ModelCard:
    """Render the card of a head from `model_cards/eagle3_head.md`.

    Args:
        config: the head's config; the target, layer ids and vocabularies come from it.
        repo_id: where the head is (or will be) published; used in the usage snippets.
        format: the checkpoint layout the repo holds (see `save_pretrained(format=...)`); picks the usage snippet.
        base_model: hub id of the target; defaults to the config's `target_name_or_path` when that is a hub id.
        training_data: free text on the data the head was trained on (prompts, who wrote the answers, size).
        datasets: hub dataset ids used for training, for the card's metadata.
        acceptance: measured mean acceptance length (tokens per target forward) per benchmark, e.g.
            `{"MT-bench": 3.1}`.
        license / tags: card metadata; tags add to the EAGLE-3 ones.
    """
    layout = checkpoint_layout(format)
    base_model = base_model or _hub_model_id(config.target_name_or_path)
    model_name = repo_id.split("/")[-1] if repo_id else f"EAGLE-3 draft head for {base_model or 'a causal LM'}"
    card_tags = ["eagle3", "speculative-decoding", "draft-model", "hf-eagle3", *FORMAT_TAGS[layout]]
    card_tags += [tag for tag in tags or [] if tag not in card_tags]
    card_data = ModelCardData(
        base_model=base_model,
        library_name="transformers" if layout == NATIVE_LAYOUT else None,
        tags=card_tags,
        datasets=datasets,
        license=license,
        pipeline_tag="text-generation",  # what the head serves: drafting for a text-generation target
    )
    ids = config.target_layer_ids
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        model_name=model_name,
        repo_id=repo_id or "PATH_TO_THIS_HEAD",
        base_model=base_model,
        target_name=config.target_name_or_path,
        layout=layout,
        format_title=FORMAT_TITLES[layout],
        target_layer_ids=list(ids) if ids else None,
        stored_layer_ids=[i - 1 for i in ids] if ids and layout == SPECFORGE_LAYOUT else None,
        hidden_size=config.hidden_size,
        target_hidden_size=config.target_hidden_size,
        draft_vocab_size=config.draft_vocab_size,
        vocab_size=config.vocab_size,
        max_position_embeddings=config.max_position_embeddings,
        training_data=training_data,
        acceptance=acceptance,
    )


__all__ = ["create_model_card"]
