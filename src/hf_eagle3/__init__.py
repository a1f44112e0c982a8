"""hf-eagle3: EAGLE-3 speculative decoding, native to Hugging Face transformers.

`import hf_eagle3` is light: names load on first use, so the command line answers `--help` at once and training
code loads only with the trainer. The first name used also registers the head with the Auto classes and installs
the `generate(assistant_model=<EAGLE-3 head>)` hook (`disable_eagle3_generation()` undoes it).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> submodule that defines it
_NAMES: dict[str, str] = {
    "Eagle3Config": "configuration_eagle3",
    "Eagle3DraftModel": "modeling_eagle3",
    "Eagle3DraftOutput": "modeling_eagle3",
    "create_model_card": "model_card",
    "Eagle3CandidateGenerator": "decoding",
    "Eagle3GenerateDecoderOnlyOutput": "decoding",
    "Eagle3GenerationStats": "decoding",
    "disable_eagle3_generation": "decoding",
    "enable_eagle3_generation": "decoding",
    "build_vocab_maps": "data",
    "document_prompts": "data",
    "load_documents": "data",
    "load_vocab_map": "data",
    "regenerate_conversations": "data",
    "save_vocab_map": "data",
    "synthesize_documents": "data",
    "synthesize_prompts": "data",
    "tokenize_conversations": "data",
    "OFFLINE_TARGETS": "offline_models",
    "OfflineModelError": "offline_models",
    "OfflineTarget": "offline_models",
    "get_offline_target": "offline_models",
    "load_target": "offline_models",
    "load_target_config": "offline_models",
    "materialize_gguf": "offline_models",
    "shipped_head_path": "offline_models",
    "Eagle3DataCollator": "trainer",
    "Eagle3FeatureDataset": "trainer",
    "Eagle3Trainer": "trainer",
    "Eagle3TrainingArguments": "trainer",
    "prepare_features": "trainer",
}

_installed = False


def _install() -> None:
    """Register the head with `AutoConfig`/`AutoModel` and install the `generate` hook, once."""
    global _installed
    if _installed:
        return
    from transformers import AutoConfig, AutoModel

    from .configuration_eagle3 import Eagle3Config
    from .decoding import enable_eagle3_generation
    from .modeling_eagle3 import Eagle3DraftModel

    AutoConfig.register(Eagle3Config.model_type, Eagle3Config)
    AutoModel.register(Eagle3Config, Eagle3DraftModel)
    enable_eagle3_generation()
    _installed = True


def __getattr__(name: str) -> Any:
    if name not in _NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    _install()
    value = getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_NAMES])


if TYPE_CHECKING:
    from .configuration_eagle3 import Eagle3Config
    from .data import (
        build_vocab_maps,
        document_prompts,
        load_documents,
        load_vocab_map,
        regenerate_conversations,
        save_vocab_map,
        synthesize_documents,
        synthesize_prompts,
        tokenize_conversations,
    )
    from .decoding import (
        Eagle3CandidateGenerator,
        Eagle3GenerateDecoderOnlyOutput,
        Eagle3GenerationStats,
        disable_eagle3_generation,
        enable_eagle3_generation,
    )
    from .model_card import create_model_card
    from .modeling_eagle3 import Eagle3DraftModel, Eagle3DraftOutput
    from .offline_models import (
        OFFLINE_TARGETS,
        OfflineModelError,
        OfflineTarget,
        get_offline_target,
        load_target,
        load_target_config,
        materialize_gguf,
        shipped_head_path,
    )
    from .trainer import (
        Eagle3DataCollator,
        Eagle3FeatureDataset,
        Eagle3Trainer,
        Eagle3TrainingArguments,
        prepare_features,
    )

__all__ = [
    "Eagle3CandidateGenerator",
    "Eagle3Config",
    "Eagle3DataCollator",
    "Eagle3DraftModel",
    "Eagle3DraftOutput",
    "Eagle3FeatureDataset",
    "Eagle3GenerateDecoderOnlyOutput",
    "Eagle3GenerationStats",
    "Eagle3Trainer",
    "Eagle3TrainingArguments",
    "OFFLINE_TARGETS",
    "OfflineModelError",
    "OfflineTarget",
    "__version__",
    "build_vocab_maps",
    "create_model_card",
    "disable_eagle3_generation",
    "document_prompts",
    "enable_eagle3_generation",
    "get_offline_target",
    "load_documents",
    "load_target",
    "load_target_config",
    "load_vocab_map",
    "materialize_gguf",
    "prepare_features",
    "regenerate_conversations",
    "save_vocab_map",
    "shipped_head_path",
    "synthesize_documents",
    "synthesize_prompts",
    "tokenize_conversations",
]
