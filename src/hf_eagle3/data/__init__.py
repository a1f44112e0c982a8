"""Training data for EAGLE-3 heads: chat tokenisation with assistant-only loss masks, target-written answers and
prompts, long-prompt conversations over documents, and the draft vocabulary. Heavy optional imports (`datasets`, `trl`)
stay inside the functions that use them."""

from .chat import (
    get_assistant_mask_template,
    load_chat_dataset,
    to_messages,
    tokenize_conversation,
    tokenize_conversations,
)
from .document_tasks import DocumentPrompt, document_prompts
from .documents import Document, load_documents, synthesize_documents
from .generation import filter_prompts, generate_texts, regenerate_conversations, synthesize_prompts, user_turn_prefix
from .vocab import (
    VOCAB_MAP_NAME,
    build_vocab_maps,
    count_loss_tokens,
    coverage_by_size,
    load_vocab_map,
    save_vocab_map,
    vocab_coverage,
)

__all__ = [
    "VOCAB_MAP_NAME",
    "Document",
    "DocumentPrompt",
    "build_vocab_maps",
    "count_loss_tokens",
    "coverage_by_size",
    "document_prompts",
    "filter_prompts",
    "generate_texts",
    "get_assistant_mask_template",
    "load_chat_dataset",
    "load_documents",
    "load_vocab_map",
    "regenerate_conversations",
    "save_vocab_map",
    "synthesize_documents",
    "synthesize_prompts",
    "to_messages",
    "tokenize_conversation",
    "tokenize_conversations",
    "user_turn_prefix",
    "vocab_coverage",
]
