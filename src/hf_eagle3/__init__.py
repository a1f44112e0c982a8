"""hf-eagle3: EAGLE-3 speculative decoding, native to Hugging Face transformers."""

from transformers import AutoConfig, AutoModel

from .configuration_eagle3 import Eagle3Config
from .data import (
    build_vocab_maps,
    load_vocab_map,
    regenerate_conversations,
    save_vocab_map,
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
    materialize_gguf,
    shipped_head_path,
)
from .trainer import Eagle3DataCollator, Eagle3FeatureDataset, Eagle3Trainer, Eagle3TrainingArguments, prepare_features

AutoConfig.register(Eagle3Config.model_type, Eagle3Config)
AutoModel.register(Eagle3Config, Eagle3DraftModel)
# `target.generate(..., assistant_model=draft)` runs EAGLE-3 from here on; `disable_eagle3_generation()` undoes it.
enable_eagle3_generation()

__version__ = "0.1.0"

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
    "enable_eagle3_generation",
    "get_offline_target",
    "load_target",
    "load_vocab_map",
    "materialize_gguf",
    "prepare_features",
    "regenerate_conversations",
    "save_vocab_map",
    "shipped_head_path",
    "synthesize_prompts",
    "tokenize_conversations",
]
