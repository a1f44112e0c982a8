"""EAGLE-3 chain mode as a transformers `CandidateGenerator`: the head drafts, transformers' assisted decoding verifies.

transformers calls `get_candidates` before every target forward and hands it the target's previous
verification outputs (`requires_model_outputs = True`). The three feature layers the head reads are captured
with forward pre-hooks on the target's decoder layers (see `TargetFeatureCapture`), so the target needs no
`output_hidden_states` and nothing target-specific is asked of transformers.

After each verification the head re-encodes the newly accepted positions from the target's fused features of that
pass, then drafts `num_assistant_tokens` tokens on its own outputs; its KV cache only ever keeps accepted positions.
Tree mode runs its own loop (`tree_loop`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from transformers import GenerationConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.generation import LogitsProcessorList, StoppingCriteriaList
from transformers.generation.candidate_generator import CandidateGenerator

from ..target_features import TargetFeatureCapture
from .stats import Eagle3GenerationStats
from .stopping import first_stop, host_stop_rule

if TYPE_CHECKING:
    from ..modeling_eagle3 import Eagle3DraftModel
    from .config import Eagle3DecodingConfig


class Eagle3CandidateGenerator(CandidateGenerator):
    """Drafts chains with an EAGLE-3 head for transformers' assisted decoding loop (`eagle3_mode="chain"`).

    `target.generate(..., assistant_model=draft, eagle3_mode="chain")` builds it after resolving and checking the call's
    settings (`Eagle3DecodingConfig`, `checks.check_eagle3_inputs`). Use it as a context manager around the target
    forwards: that is when the feature hooks are on the target.

    Args:
        target: the model whose `generate` runs (a PEFT-wrapped model's base model is fine).
        draft_model: the EAGLE-3 head, attached to `target`.
        generation_config: the generation config of this call, as transformers prepared it.
        decoding_config: the call's resolved settings; `num_assistant_tokens` is the chain length.
        stats: the call's statistics, updated once per verification.
        logits_processor: the call's processors; applied to the draft's logits so that sampled drafts come
            from the distribution speculative sampling assumes.
        stopping_criteria: the call's stopping criteria (evaluated on draft prefixes, without scores, as
            transformers 5.17 does). Drafting ends at a token that would end generation: greedy leaves that token
            to the target, so the output stops exactly where the target alone stops; sampling keeps it as the last
            draft, which keeps the distribution exact.
    """

    requires_model_outputs = True
    # Features come from forward pre-hooks: the target forward needs no extra outputs.
    model_kwargs_overrides: dict[str, Any] = {}

    def __init__(
        self,
        target: PreTrainedModel,
        draft_model: Eagle3DraftModel,
        generation_config: GenerationConfig,
        decoding_config: Eagle3DecodingConfig,
        stats: Eagle3GenerationStats,
        logits_processor: LogitsProcessorList | None = None,
        stopping_criteria: StoppingCriteriaList | None = None,
    ):
        self.target = target
        self.draft_model = draft_model
        self.generation_config = generation_config
        self.decoding_config = decoding_config
        self.stats = stats
        self.logits_processor = logits_processor if logits_processor is not None else LogitsProcessorList()
        self.stopping_criteria = (
            stopping_criteria
            if stopping_criteria is not None
            else target._get_stopping_criteria(generation_config=generation_config, stopping_criteria=None)
        )
        self.do_sample = bool(generation_config.do_sample)
        self.max_length = generation_config.max_length
        self.num_assistant_tokens = decoding_config.num_assistant_tokens
        # Greedy drafts without processors need no full-vocabulary logits and no per-token host reads (the target
        # compares tokens only): the chain is drafted whole and checked for stops once.
        self.batched_greedy = not self.do_sample and len(self.logits_processor) == 0
        self.stop_rule = host_stop_rule(self.stopping_criteria)

        self._feature_capture = TargetFeatureCapture(target, list(draft_model.config.target_layer_ids))
        self._capturing = False
        self._draft_cache = DynamicCache()
        self._prefill_pending = False

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


__all__ = ["Eagle3CandidateGenerator"]
