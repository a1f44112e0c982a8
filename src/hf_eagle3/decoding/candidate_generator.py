"""EAGLE-3 as a transformers `CandidateGenerator`: the head drafts, transformers' assisted decoding verifies.

transformers calls `get_candidates` before every target forward and hands it the target's previous
verification outputs (`requires_model_outputs = True`). The three feature layers the head reads are captured
with forward pre-hooks on the target's decoder layers (see `TargetFeatureCapture`), so the target needs no
`output_hidden_states` and nothing target-specific is asked of transformers.

Chain mode (this module): after each verification the head re-encodes the newly accepted positions from the
target's fused features of that pass, then drafts `num_assistant_tokens` tokens on its own outputs; its KV
cache only ever keeps accepted positions (reference section 4.1). Tree mode reads its knobs from the same
object and runs in `hf_eagle3.decoding.tree`.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache, StaticCache
from transformers.generation import LogitsProcessorList, StoppingCriteriaList
from transformers.generation.candidate_generator import CandidateGenerator

from .._compat import CACHE_NAME
from ..modeling_eagle3 import Eagle3DraftModel
from ..target_features import TargetFeatureCapture
from .stats import Eagle3GenerationStats
from .stopping import first_stop, host_stop_rule

EAGLE3_MODES = ("tree", "chain")
# The reference code's default dynamic tree (reference section 4), 60/7/10 there: its depth counts the head forwards
# after the first, so its paths hold up to 8 drafts, which is `eagle3_depth=8` here (drafts per path). The chain
# length is what one eager head step (~1 ms) buys against one target forward (~22 ms) at a per-token acceptance
# around 0.7 (gpu.md).
DEFAULT_EAGLE3_KNOBS: dict[str, Any] = {
    "eagle3_mode": "tree",
    "eagle3_total_tokens": 60,
    "eagle3_depth": 8,
    "eagle3_top_k": 10,
    # Tree mode on static caches with CUDA graphs: None where it applies (CUDA, see `static_tree.use_static_tree`),
    # True to insist (also off CUDA, without graphs), False for the dynamic cache.
    "eagle3_static_cache": None,
    # The static path's step functions compiled by torch.compile before they are captured (`static_tree`): True or
    # False. Opt-in, as transformers' compiled generate is: each new runner (tree shape, longer cache) compiles for
    # tens of seconds, after which a step runs ~2.3x faster (SmolLM2-135M on an H100: 3.3 instead of 8.0 ms).
    "eagle3_compile": False,
}
DEFAULT_CHAIN_LENGTH = 6
# transformers fills `num_assistant_tokens` with a global default (20, sized for small assistant LMs) before the
# candidate generator sees it. The dispatch records here the value the caller actually chose, if any.
EXPLICIT_CHAIN_LENGTH_ATTRIBUTE = "_eagle3_num_assistant_tokens"


class Eagle3CandidateGenerator(CandidateGenerator):
    """Drafts candidates with an EAGLE-3 head for `target.generate(..., assistant_model=draft)`.

    Knobs are read from the call's generation config (generate kwargs `eagle3_mode`, `eagle3_total_tokens`,
    `eagle3_depth`, `eagle3_top_k`, `eagle3_static_cache`, `eagle3_compile`, `num_assistant_tokens`), then from
    `draft.generation_config`, then the defaults above. Use it as a context manager around the target forwards in
    chain mode: that is when the feature hooks are on the target.

    Args:
        target: the model whose `generate` runs (a PEFT-wrapped model's base model is fine).
        draft_model: the EAGLE-3 head; attached to `target` here if it was not yet.
        generation_config: the generation config of this call, as transformers prepared it.
        input_ids: the prompt, `(1, prompt_length)`.
        logits_processor: the call's processors; applied to the draft's logits so that sampled drafts come
            from the distribution speculative sampling assumes.
        stopping_criteria: the call's stopping criteria (evaluated on draft prefixes, without scores, as
            transformers 5.17 does). Drafting ends at a token that would end generation: greedy leaves that token
            to the target, so the output stops exactly where the target alone stops; sampling keeps it as the last
            draft, which keeps the distribution exact.
        model_kwargs: the call's model kwargs (cache, attention mask).
    """

    requires_model_outputs = True
    # Features come from forward pre-hooks: the target forward needs no extra outputs.
    model_kwargs_overrides: dict[str, Any] = {}

    def __init__(
        self,
        target: PreTrainedModel,
        draft_model: Eagle3DraftModel,
        generation_config: GenerationConfig,
        input_ids: torch.LongTensor,
        logits_processor: LogitsProcessorList | None = None,
        stopping_criteria: StoppingCriteriaList | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ):
        model_kwargs = model_kwargs or {}
        if input_ids.shape[0] != 1:
            raise ValueError(
                f"EAGLE-3 decoding runs one sequence at a time (batch size 1, like the reference implementation); "
                f"got a batch of {input_ids.shape[0]}. Call `generate` once per prompt."
            )
        cache = model_kwargs.get(CACHE_NAME)
        if isinstance(cache, StaticCache):
            raise ValueError(
                "EAGLE-3 decoding rolls the target's KV cache back after every verification, which a StaticCache "
                "cannot do. Let `generate` create its default dynamic cache (pass no cache object)."
            )
        draft_model.check_target(target)
        if not draft_model.has_target_embeddings:
            draft_model.attach_target(target)
        draft_model.check_vocab_maps()

        self.target = target
        self.draft_model = draft_model
        self.generation_config = generation_config
        self.logits_processor = logits_processor if logits_processor is not None else LogitsProcessorList()
        self.stopping_criteria = (
            stopping_criteria
            if stopping_criteria is not None
            else target._get_stopping_criteria(generation_config=generation_config, stopping_criteria=None)
        )
        self.do_sample = bool(generation_config.do_sample)
        self.max_length = generation_config.max_length
        # Greedy drafts without processors need no full-vocabulary logits and no per-token host reads (the target
        # compares tokens only): the chain is drafted whole and checked for stops once.
        self.batched_greedy = not self.do_sample and len(self.logits_processor) == 0
        self.stop_rule = host_stop_rule(self.stopping_criteria)

        self.mode = self._knob("eagle3_mode")
        if self.mode not in EAGLE3_MODES:
            raise ValueError(f"eagle3_mode must be one of {EAGLE3_MODES}, got {self.mode!r}.")
        self.total_tokens = self._positive_int_knob("eagle3_total_tokens")
        self.depth = self._positive_int_knob("eagle3_depth")
        self.top_k = self._positive_int_knob("eagle3_top_k")
        self.num_assistant_tokens = self._chain_length()
        self.static_cache = self._knob("eagle3_static_cache")
        if self.static_cache is not None and not isinstance(self.static_cache, bool):
            raise ValueError(
                f"eagle3_static_cache must be None (automatic), True or False, got {self.static_cache!r}."
            )
        if self.static_cache and self.mode != "tree":
            raise ValueError(
                "eagle3_static_cache=True applies to tree decoding; chain mode runs transformers' own loop on the "
                "dynamic cache. Pass eagle3_mode='tree' or drop eagle3_static_cache."
            )
        self.compile = self._knob("eagle3_compile")
        if not isinstance(self.compile, bool):
            raise ValueError(f"eagle3_compile must be True or False, got {self.compile!r}.")
        if self.compile and (self.mode != "tree" or self.static_cache is False):
            raise ValueError(
                f"eagle3_compile=True compiles the tree step on static caches, which eagle3_mode={self.mode!r} with "
                f"eagle3_static_cache={self.static_cache!r} does not run. Pass eagle3_mode='tree' with "
                "eagle3_static_cache=None (static caches where they apply) or True, or drop eagle3_compile."
            )
        attn_implementation = getattr(target.config, "_attn_implementation", None) or ""
        if self.mode == "tree" and "flash" in attn_implementation:
            raise ValueError(
                f"EAGLE-3 tree decoding verifies a draft tree in one target forward with a 4D tree attention mask, "
                f"which the target's attention implementation {attn_implementation!r} cannot take. Load the target "
                "with attn_implementation='sdpa' (or 'eager'), or pass eagle3_mode='chain'."
            )
        self.feature_layer_ids = list(draft_model.config.target_layer_ids)

        # A fresh record per generate call, also reachable from the head after the call.
        self.stats = Eagle3GenerationStats()
        draft_model.last_generation_stats = self.stats

        self._feature_capture = TargetFeatureCapture(target, self.feature_layer_ids)
        self._capturing = False
        self._draft_cache = DynamicCache()
        self._prefill_pending = False

    # ------------------------------------------------------------------ knobs
    def _knob(self, name: str) -> Any:
        draft_config = getattr(self.draft_model, "generation_config", None)
        for config in (self.generation_config, draft_config):
            value = getattr(config, name, None)
            if value is not None:
                return value
        return DEFAULT_EAGLE3_KNOBS[name]

    def _positive_int_knob(self, name: str) -> int:
        value = self._knob(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        return value

    def _chain_length(self) -> int:
        draft_config = getattr(self.draft_model, "generation_config", None)
        value = getattr(self.generation_config, EXPLICIT_CHAIN_LENGTH_ATTRIBUTE, None)
        if value is None:
            value = getattr(draft_config, "num_assistant_tokens", None)
        if value is None:
            return DEFAULT_CHAIN_LENGTH
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"num_assistant_tokens must be a positive integer, got {value!r}.")
        return value

    # ------------------------------------------------------------------ feature hooks
    def __enter__(self) -> Eagle3CandidateGenerator:
        self._feature_capture.__enter__()
        self._capturing = True
        return self

    def __exit__(self, *exc) -> None:
        self._feature_capture.__exit__(*exc)
        self._capturing = False

    # ------------------------------------------------------------------ drafting
    def _sequence_positions(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Real token positions of the sequence, as transformers derives them (padding-aware)."""
        if attention_mask is None:
            return torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    @torch.no_grad()
    def get_candidates(
        self,
        input_ids: torch.LongTensor,
        model_kwargs: dict[str, Any] | None = None,
        model_outputs: Any = None,
        is_first_iteration: bool = False,
        n_last_matches: int = 0,
        **kwargs,
    ) -> tuple[torch.LongTensor, torch.Tensor | None]:
        """Draft a chain after `input_ids`; returns `(input_ids + drafts, full-vocabulary draft logits)`."""
        if not self._capturing:
            raise RuntimeError(
                "Eagle3CandidateGenerator reads the target's features through hooks that are only active inside "
                "`with generator:`; `target.generate(..., assistant_model=draft)` does this for you."
            )
        if is_first_iteration:
            # The target's prefill produces the features the first draft needs: let it run first.
            self._prefill_pending = True
            return input_ids, None

        draft = self.draft_model
        device = draft.device
        attention_mask = (model_kwargs or {}).get("attention_mask")
        positions = self._sequence_positions(input_ids, attention_mask).to(device)
        key_mask = attention_mask.to(device) if attention_mask is not None else None
        tokens = input_ids.to(device)
        sequence_length = input_ids.shape[1]

        # Head entry `t` holds the target features of position `t` with the embedding of token `t + 1`, so every
        # position but the last (whose successor is not known yet) can be encoded.
        encoded = self._draft_cache.get_seq_length()
        new_positions = sequence_length - 1 - encoded
        features = self._feature_capture.pop()
        if features.shape[1] < new_positions:
            raise ValueError(
                f"EAGLE-3 needs target features for every prompt token, but the target's last forward covered "
                f"{features.shape[1]} of the {new_positions} positions to encode (a pre-filled cache or chunked "
                "prefill?). Start generation from an empty cache."
            )
        output = draft(
            input_ids=tokens[:, encoded + 1 :],
            target_hidden_states=features[:, :new_positions].to(device),
            attention_mask=key_mask[:, : sequence_length - 1] if key_mask is not None else None,
            position_ids=positions[:, encoded : sequence_length - 1],
            past_key_values=self._draft_cache,
            logits_to_keep=1,
        )
        accepted_length = self._draft_cache.get_seq_length()

        max_drafts = min(self.num_assistant_tokens, self.max_length - sequence_length - 1)
        candidate_ids = input_ids
        candidate_logits = []
        for step in range(max_drafts):
            if step > 0:
                # Draft step `step` is head entry `sequence_length - 2 + step`: its own previous output stands in
                # for the target features, and it attends to the accepted entries and the earlier drafts.
                draft_mask = None
                if key_mask is not None:
                    draft_mask = torch.cat([key_mask, key_mask.new_ones((1, step - 1))], dim=-1)
                output = draft(
                    input_ids=candidate_ids[:, -1:].to(device),
                    hidden_states=output.hidden_states[:, -1:],
                    attention_mask=draft_mask,
                    position_ids=positions[:, -1:] + (step - 1),
                    past_key_values=self._draft_cache,
                )
            if self.batched_greedy:
                token = draft.draft_to_target_ids(output.logits[:, -1].argmax(dim=-1, keepdim=True))
                candidate_ids = torch.cat([candidate_ids, token.to(candidate_ids.device)], dim=-1)
                continue
            logits = draft.draft_logits_to_target_vocab(output.logits[:, -1].float()).to(input_ids.device)
            if len(self.logits_processor) > 0:
                logits = self.logits_processor(candidate_ids, logits)
            if not torch.isfinite(logits).any():
                # The processors left no draft-vocabulary token: let the target decide from here.
                break
            if self.do_sample:
                token = torch.multinomial(logits.softmax(dim=-1), num_samples=1)
            else:
                token = logits.argmax(dim=-1, keepdim=True)
            extended = torch.cat([candidate_ids, token], dim=-1)
            stops = bool(self.stopping_criteria(extended, None).any())
            if stops and not self.do_sample:
                # Greedy: leave the stopping token to the target's own pick, so generation ends exactly there.
                break
            candidate_ids = extended
            candidate_logits.append(logits)
            if stops:
                # Sampling: keep it as the last draft. Dropping it would make every kept draft a sample from its
                # logits *conditioned on not stopping*, and speculative sampling would undercount EOS.
                break

        drafted_positions = self._draft_cache.get_seq_length() - accepted_length
        if drafted_positions > 0:
            self._draft_cache.crop(-drafted_positions)
        if self.batched_greedy:
            drafts = candidate_ids[:, sequence_length:]
            stop = first_stop(self.stopping_criteria, self.stop_rule, input_ids, drafts, drafts[0].tolist())
            # As above: a stopping draft is left to the target's own pick.
            return candidate_ids[:, : sequence_length + (drafts.shape[1] if stop is None else stop)], None
        if not candidate_logits:
            return input_ids, None
        return candidate_ids, torch.stack(candidate_logits, dim=1)

    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.Tensor, num_matches: int) -> None:
        """Record the verification step; the chain length stays fixed (the head's acceptance is what it is)."""
        if self._prefill_pending:
            self._prefill_pending = False
            return
        num_matches = int(num_matches)
        self.stats.record(num_matches, num_matches + 1)


__all__ = ["DEFAULT_CHAIN_LENGTH", "DEFAULT_EAGLE3_KNOBS", "EAGLE3_MODES", "Eagle3CandidateGenerator"]
