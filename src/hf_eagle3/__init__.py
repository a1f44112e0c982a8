"""hf-eagle3: EAGLE-3 speculative decoding, native to Hugging Face transformers."""

from transformers import AutoConfig, AutoModel

from .configuration_eagle3 import Eagle3Config
from .model_card import create_model_card
from .modeling_eagle3 import Eagle3DraftModel, Eagle3DraftOutput

AutoConfig.register(Eagle3Config.model_type, Eagle3Config)
AutoModel.register(Eagle3Config, Eagle3DraftModel)

__version__ = "0.1.0"

__all__ = ["Eagle3Config", "Eagle3DraftModel", "Eagle3DraftOutput", "__version__", "create_model_card"]
