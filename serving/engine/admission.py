"""Admission: a request's prompt and parameters checked against the model and the server's limits, and
turned into a Sequence for the scheduler. Everything here fails fast with a RequestError (HTTP 400)."""

from __future__ import annotations

import dataclasses
import functools
import secrets

from pydantic import ValidationError
from transformers import PreTrainedTokenizerBase

from serving.engine.config import EngineConfig
from serving.engine.exceptions import RequestError
from serving.engine.params import (
    FULL_DEPTH,
    ExitLimits,
    ExitParams,
    PhaseExits,
    SamplingParams,
    request_error,
    resolve_exit,
)
from serving.engine.plan import PipelinePlan
from serving.engine.scheduler import Sequence
from serving.engine.speculative import (
    MAX_BATCH,
    RoundCost,
    SpecConfig,
    SpecState,
    SpeculativeParams,
    auto_depth,
    check_default,
    draft_depths,
    resolve_speculative,
)
from workers.arch import ModelArch
from workers.device import resolve_device
from workers.exit_pack import ExitPack


class Admission:
    def __init__(
        self,
        config: EngineConfig,
        plan: PipelinePlan,
        tokenizer: PreTrainedTokenizerBase,
        arch: ModelArch,
        pack: ExitPack | None,
    ) -> None:
        self.config, self.plan, self.tokenizer, self.arch = config, plan, tokenizer, arch
        # Policy learned needs a trained router at every early exit point (configured points may differ).
        early = [d for d in plan.exit_points if d < plan.num_layers]
        routed = pack is not None and all(pack.prefixed(f"router.{d}.") for d in early)
        self.limits: ExitLimits = plan.limits(routed)
        # Requests' unset exit controls: the configuration's, else what the exit pack was tuned for.
        tuned = pack.defaults if routed else {}
        own = config.exit.model_dump(exclude_none=True)
        defaults = {**tuned, **own}
        if "prefill" in tuned:  # the configuration's own controls are its prompt tokens' too, as a request's are
            mine = {k: v for k, v in own.items() if k != "prefill"}
            defaults["prefill"] = {**({} if mine else tuned["prefill"]), **own.get("prefill", {})} or None
        self.exit_defaults = ExitParams.model_validate(defaults)
        self._device = resolve_device(config.device).type  # where the workers run: what verifying costs there
        max_batch = config.speculative_max_batch
        self.speculative_max_batch = max_batch if max_batch is not None else MAX_BATCH.get(self._device, 8)
        check_default(config.speculative, plan.groups)
        self._agreement = {} if pack is None else pack.agreement
        self.draft_depths = draft_depths(plan.exit_points, plan.num_layers)

    def sequence(
        self,
        request_id: str,
        prompt: str | list[int],
        sampling: SamplingParams | dict | None,
        exit: ExitParams | dict | None,
        speculative: SpeculativeParams | dict | None = None,
    ) -> Sequence:
        try:
            sampling = SamplingParams.model_validate(sampling or {})
        except ValidationError as e:
            raise request_error(e) from None
        spec = self.resolve_speculative(speculative)
        resolved = self.resolve_exit(exit) if spec is None else self._speculative_exit(exit)
        prompt_ids = self.prompt_ids(prompt)
        room = self.plan.max_model_len - len(prompt_ids)
        cap = self.config.max_tokens_limit
        if cap is not None and sampling.max_tokens is not None and sampling.max_tokens > cap:
            raise RequestError(
                "max_tokens", f"{sampling.max_tokens} is over this server's limit (max_tokens_limit {cap})"
            )
        if sampling.max_tokens is not None and sampling.max_tokens > room:
            raise RequestError(
                "max_tokens",
                f"{sampling.max_tokens} new tokens do not fit: the context holds {self.plan.max_model_len} "
                f"tokens and the prompt has {len(prompt_ids)}",
            )
        return Sequence(
            request_id=request_id,
            prompt_ids=prompt_ids,
            sampling=sampling,
            exit=resolved,
            seed=sampling.seed if sampling.seed is not None else secrets.randbits(62),
            max_tokens=sampling.max_tokens if sampling.max_tokens is not None else min(room, cap or room),
            spec=None if spec is None else SpecState(spec),
        )

    def resolve_speculative(self, speculative: SpeculativeParams | dict | None) -> SpecConfig | None:
        """The request's speculative mode, else the server's, with the cost model that decides how many
        drafts pay (none with engine.speculative_adaptive off)."""
        try:
            spec = resolve_speculative(speculative, self.config.speculative, self.plan.groups, self.auto_depth)
        except ValidationError as e:
            raise request_error(e, "adept.speculative.") from None
        if spec is None or not self.config.speculative_adaptive:
            return spec
        return dataclasses.replace(spec, cost=self._cost(spec.depth))

    @functools.cache  # noqa: B019 (one Admission per engine)
    def auto_depth(self, num_tokens: int) -> int:
        """What draft_depth 'auto' means for rounds of up to `num_tokens` drafts (speculative.auto_depth)."""
        return auto_depth(num_tokens, self.draft_depths, self._agreement, self._cost)

    def _cost(self, depth: int) -> RoundCost:
        return RoundCost.of(self.arch, depth, self._device, self.config.draft_vocab_size)

    def _speculative_exit(self, exit: ExitParams | dict | None) -> PhaseExits:
        """Speculative decoding verifies every generated token at full depth, and reads the prompt at full
        depth unless the request sets `prefill` (the server's prefill defaults do not apply: the reference
        is full depth for the whole request)."""
        try:
            params = ExitParams.model_validate(exit or {})
        except ValidationError as e:
            raise request_error(e, "adept.") from None
        own = params.model_dump(exclude_none=True, exclude={"prefill"})
        if own:
            raise RequestError(
                f"adept.{next(iter(own))}",
                "speculative decoding verifies every generated token at full depth: it takes no exit controls "
                "for them (set adept.prefill for prompt tokens, or turn speculative off)",
            )
        if params.prefill is None:
            return PhaseExits(FULL_DEPTH, FULL_DEPTH)
        prefill = resolve_exit(ExitParams(prefill=params.prefill), ExitParams(), self.limits)
        return PhaseExits(FULL_DEPTH, prefill.prefill, prefill.full_depth_last)

    def resolve_exit(self, exit: ExitParams | dict | None) -> PhaseExits:
        """A request's exit controls for prompt and generated tokens, its unset ones from the defaults,
        checked against the limits."""
        try:
            exit_params = ExitParams.model_validate(exit or {})
        except ValidationError as e:
            raise request_error(e, "adept.") from None
        return resolve_exit(exit_params, self.exit_defaults, self.limits)

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        else:
            ids = list(prompt)
            bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.arch.vocab_size]
            if bad:
                raise RequestError(
                    "prompt", f"token id {bad[0]!r} is outside the vocabulary [0, {self.arch.vocab_size})"
                )
        if not ids:
            raise RequestError("prompt", "must not be empty")
        cap = self.config.max_prompt_tokens
        if cap is not None and len(ids) > cap:
            raise RequestError("prompt", f"{len(ids)} tokens is over this server's limit (max_prompt_tokens {cap})")
        if len(ids) >= self.plan.max_model_len:
            raise RequestError(
                "prompt",
                f"{len(ids)} tokens is too long: the context holds {self.plan.max_model_len} tokens, prompt "
                "and generated together",
            )
        return ids
