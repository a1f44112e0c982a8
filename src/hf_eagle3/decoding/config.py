"""The settings of one EAGLE-3 `generate` call, resolved and checked once, then read by both decoding modes.

Each knob comes from the call (generate kwargs, or the `generation_config` passed to `generate`), else from the
head's own `generation_config` (saved with the head as `generation_config.json`), else from the defaults below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import GenerationConfig

EAGLE3_MODES = ("tree", "chain")
# "auto": the tree shape that fits the device, measured once and cached (`tree_shape`); "fixed": the shape knobs.
EAGLE3_TREES = ("auto", "fixed")
SHAPE_KNOBS = ("eagle3_total_tokens", "eagle3_depth", "eagle3_top_k")
# The dynamic tree of the official EAGLE code, 60/7/10 there: its `depth` counts the head forwards after the first,
# so its paths hold up to 8 drafts, which is `eagle3_depth=8` here (drafts per path = head forwards per step).
# They are the shape of `eagle3_tree="fixed"`, which setting any shape knob selects.
DEFAULT_EAGLE3_KNOBS: dict[str, Any] = {
    "eagle3_mode": "tree",
    "eagle3_tree": "auto",
    "eagle3_total_tokens": 60,
    "eagle3_depth": 8,
    "eagle3_top_k": 10,
    # Tree mode on static caches: None where it applies (CUDA, see `static_tree.use_static_tree`), True to insist
    # (also off CUDA, without graphs), False for the dynamic cache.
    "eagle3_static_cache": None,
    # The static path's step functions compiled by torch.compile before they are captured: opt-in, as transformers'
    # compiled generate is, since each new runner (tree shape, longer cache) compiles first.
    "eagle3_compile": False,
    # The requests (text) the automatic tree calibrates acceptance on: None for the built-in ones (`calibration`).
    "eagle3_calibration_prompts": None,
}
# Tree-only knobs: chain mode drafts `num_assistant_tokens` tokens instead.
TREE_KNOBS = ("eagle3_tree", *SHAPE_KNOBS, "eagle3_static_cache", "eagle3_compile", "eagle3_calibration_prompts")
# Knobs of transformers' other assistants (small LMs, prompt lookup, universal assisted decoding): the EAGLE-3 head
# drafts by its own rules, so setting them changes nothing.
UNUSED_ASSISTED_KNOBS = (
    "num_assistant_tokens_schedule",
    "assistant_confidence_threshold",
    "assistant_lookbehind",
    "target_lookbehind",
    "max_matching_ngram_size",
)
# Drafts per chain step: about what a head's acceptance pays for against one target forward.
DEFAULT_CHAIN_LENGTH = 6
# transformers fills `num_assistant_tokens` with a global default (20, sized for small assistant LMs) before the
# decoding method sees it, so the dispatch records under this name the value the caller actually chose, if any.
EXPLICIT_CHAIN_LENGTH_ATTRIBUTE = "_eagle3_num_assistant_tokens"
# The names of the eagle3_* knobs this call set itself (generate kwargs or the generation config it passed).
CALL_KNOBS_ATTRIBUTE = "_eagle3_call_knobs"


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return value


def _requests(value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ValueError(
            f"eagle3_calibration_prompts must be a list of requests (strings, each one user turn), got {value!r}."
        )
    if not value or not all(isinstance(request, str) and request.strip() for request in value):
        raise ValueError(
            f"eagle3_calibration_prompts must hold at least one request, each a non-empty string, got {value!r}."
        )
    return tuple(value)


@dataclass(frozen=True)
class Eagle3DecodingConfig:
    """How one call decodes: `mode` (`"tree"` or `"chain"`), `tree` (`"auto"`: the shape is measured for the device,
    see `tree_shape`, and filled in before decoding; `"fixed"`, also of a config built directly: the shape as given),
    the tree's shape (`total_tokens`: nodes verified per step, root included; `depth`: most draft tokens per step;
    `top_k`: branching), `num_assistant_tokens` (drafts per chain step), `static_cache` (`eagle3_static_cache`),
    `compile` (`eagle3_compile`) and `calibration_prompts` (`eagle3_calibration_prompts`: the requests the automatic
    tree calibrates on, each one user turn; None for the built-in ones; a list is kept as a tuple)."""

    mode: str = DEFAULT_EAGLE3_KNOBS["eagle3_mode"]
    tree: str = "fixed"
    total_tokens: int = DEFAULT_EAGLE3_KNOBS["eagle3_total_tokens"]
    depth: int = DEFAULT_EAGLE3_KNOBS["eagle3_depth"]
    top_k: int = DEFAULT_EAGLE3_KNOBS["eagle3_top_k"]
    num_assistant_tokens: int = DEFAULT_CHAIN_LENGTH
    static_cache: bool | None = DEFAULT_EAGLE3_KNOBS["eagle3_static_cache"]
    compile: bool = DEFAULT_EAGLE3_KNOBS["eagle3_compile"]
    calibration_prompts: tuple[str, ...] | None = DEFAULT_EAGLE3_KNOBS["eagle3_calibration_prompts"]

    def __post_init__(self):
        if self.mode not in EAGLE3_MODES:
            raise ValueError(f"eagle3_mode must be one of {EAGLE3_MODES}, got {self.mode!r}.")
        if self.tree not in EAGLE3_TREES:
            raise ValueError(
                f"eagle3_tree must be one of {EAGLE3_TREES} ('auto': the shape measured for this device; 'fixed': "
                f"eagle3_total_tokens, eagle3_depth and eagle3_top_k), got {self.tree!r}."
            )
        for name in ("total_tokens", "depth", "top_k"):
            _positive_int(f"eagle3_{name}", getattr(self, name))
        _positive_int("num_assistant_tokens", self.num_assistant_tokens)
        if self.static_cache is not None and not isinstance(self.static_cache, bool):
            raise ValueError(
                f"eagle3_static_cache must be None (automatic), True or False, got {self.static_cache!r}."
            )
        if self.static_cache and self.mode != "tree":
            raise ValueError(
                "eagle3_static_cache=True applies to tree decoding; chain mode runs transformers' own loop on the "
                "dynamic cache. Pass eagle3_mode='tree' or drop eagle3_static_cache."
            )
        if not isinstance(self.compile, bool):
            raise ValueError(f"eagle3_compile must be True or False, got {self.compile!r}.")
        if self.compile and (self.mode != "tree" or self.static_cache is False):
            raise ValueError(
                f"eagle3_compile=True compiles the tree step on static caches, which eagle3_mode={self.mode!r} with "
                f"eagle3_static_cache={self.static_cache!r} does not run. Pass eagle3_mode='tree' with "
                "eagle3_static_cache=None (static caches where they apply) or True, or drop eagle3_compile."
            )
        if self.calibration_prompts is not None:
            object.__setattr__(self, "calibration_prompts", _requests(self.calibration_prompts))

    @classmethod
    def resolve(
        cls,
        generation_config: GenerationConfig,
        draft_generation_config: GenerationConfig | None,
    ) -> Eagle3DecodingConfig:
        """The settings of a call from its prepared generation config and the head's own (None when it has none).

        The tree is `"fixed"` where the call or the head sets a shape knob and not `eagle3_tree` (the call's settings
        before the head's); setting both a shape knob and `eagle3_tree` in the call is an error. A batch of several
        prompts measures its automatic tree per batch size (see `batch_tree_shape`).
        """

        def setting(name: str) -> tuple[Any, int | None]:
            """The value and where it came from: 0 the call, 1 the head, None the defaults."""
            for source, config in enumerate((generation_config, draft_generation_config)):
                value = getattr(config, name, None)
                if value is not None:
                    return value, source
            return DEFAULT_EAGLE3_KNOBS[name], None

        def knob(name: str) -> Any:
            return setting(name)[0]

        tree, tree_source = setting("eagle3_tree")
        shape_sources = {name: setting(name)[1] for name in SHAPE_KNOBS}
        shape_set = [name for name, source in shape_sources.items() if source is not None]
        call_shape = [name for name in shape_set if shape_sources[name] == 0]
        if tree == "auto" and tree_source == 0 and call_shape:
            raise ValueError(
                f"eagle3_tree='auto' chooses the tree shape, and this call also sets {call_shape}. Drop those to let "
                "it choose, or pass eagle3_tree='fixed' (or leave eagle3_tree out) to decode with them."
            )
        if shape_set and (tree_source is None or min(shape_sources[name] for name in shape_set) < tree_source):
            tree = "fixed"
        shape = {name: knob(f"eagle3_{name}") for name in ("total_tokens", "depth", "top_k")}

        chain_length = getattr(generation_config, EXPLICIT_CHAIN_LENGTH_ATTRIBUTE, None)
        if chain_length is None:
            chain_length = getattr(draft_generation_config, "num_assistant_tokens", None)
        return cls(
            mode=knob("eagle3_mode"),
            tree=tree,
            **shape,
            num_assistant_tokens=DEFAULT_CHAIN_LENGTH if chain_length is None else chain_length,
            static_cache=knob("eagle3_static_cache"),
            compile=knob("eagle3_compile"),
            calibration_prompts=knob("eagle3_calibration_prompts"),
        )


__all__ = [
    "DEFAULT_CHAIN_LENGTH",
    "DEFAULT_EAGLE3_KNOBS",
    "EAGLE3_MODES",
    "EAGLE3_TREES",
    "Eagle3DecodingConfig",
]
