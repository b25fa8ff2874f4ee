"""Choosing each next token the way transformers' `generate` does: the checkpoint's generation config, a request's
overrides on top, transformers' own logits processors (repetition penalty, temperature, top-k, top-p; and for a
checkpoint with a closed answer set, the prefix constraint that keeps the answer one of them).

`SamplingParams` is what travels to the ranks (plain values); `Sampler` applies it on the rank that samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    LogitsProcessorList,
    PrefixConstrainedLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. do_sample False: greedy (after the repetition penalty, as transformers does)."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    repetition_penalty: float = 1.0
    seed: int = 0
    stop_ids: tuple[int, ...] = ()
    answers: tuple[tuple[int, ...], ...] = ()  # when given, the only token sequences the answer may be

    @staticmethod
    def resolve(
        config: GenerationConfig,
        stop_ids: tuple[int, ...],
        max_new_tokens: int,
        seed: int = 0,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        repetition_penalty: float | None = None,
        answers: tuple[tuple[int, ...], ...] = (),
    ) -> SamplingParams:
        """The checkpoint's generation config with a request's overrides (None: the checkpoint's value); a given
        temperature of 0 means greedy, any other given temperature samples."""
        do_sample = bool(config.do_sample) if temperature is None else temperature > 0
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=float(temperature or config.temperature or 1.0),
            top_p=float(_given(top_p, config.top_p, 1.0)),
            top_k=int(_given(top_k, config.top_k, 0)),
            repetition_penalty=float(_given(repetition_penalty, config.repetition_penalty, 1.0)),
            seed=seed,
            stop_ids=stop_ids,
            answers=answers,
        )


def _given(request_value: float | None, config_value: float | None, neutral: float) -> float:
    """The request's value, else the checkpoint's, else the neutral one."""
    if request_value is not None:
        return request_value
    return neutral if config_value is None else config_value


class Sampler:
    """Picks tokens for one request: transformers' logits processors over the ids so far, then greedy or a draw from
    a generator seeded with `params.seed` (the same tokens on every device). The ids live in one buffer on the
    logits' device, sized for the prompt and `params.max_new_tokens` (nothing is copied per token)."""

    def __init__(self, params: SamplingParams, prompt_ids: torch.Tensor) -> None:
        self.params = params
        self.prompt_length = prompt_ids.numel()
        self.length = self.prompt_length
        self._prompt_ids = prompt_ids.detach().to(torch.long).reshape(-1)
        self._ids: torch.Tensor | None = None  # (1, prompt + max_new_tokens + 1), made on the first call's device
        processors = LogitsProcessorList()
        if params.answers:
            processors.append(PrefixConstrainedLogitsProcessor(self._allowed_next, num_beams=1))
        if params.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
        if params.do_sample:
            if params.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k:
                processors.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                processors.append(TopPLogitsWarper(params.top_p))
        self.processors = processors
        self.generator = torch.Generator().manual_seed(params.seed) if params.do_sample else None

    @property
    def ids(self) -> torch.Tensor:
        """(1, L): the prompt's ids and the tokens picked so far."""
        if self._ids is None:
            return self._prompt_ids[None]
        return self._ids[:, : self.length]

    def _allowed_next(self, batch: int, ids: torch.Tensor) -> list[int]:
        """Tokens that continue one of the allowed answers after what was generated so far."""
        done = tuple(ids[self.prompt_length :].tolist())
        return sorted({a[len(done)] for a in self.params.answers if a[: len(done)] == done and len(a) > len(done)})

    def __call__(self, logits: torch.Tensor) -> int:
        """The next token for `logits` (V,); it joins the ids the repetition penalty sees."""
        if self._ids is None or self.length == self._ids.shape[1]:
            self._grow(logits.device)
        scores = logits.float()[None]
        if self.processors:
            scores = self.processors(self.ids, scores)
        if self.params.do_sample:
            token = int(torch.multinomial(torch.softmax(scores[0], -1).cpu(), 1, generator=self.generator))
        else:
            token = int(torch.argmax(scores))
        self._ids[0, self.length] = token
        self.length += 1
        return token

    def _grow(self, device: torch.device) -> None:
        """A buffer for max_new_tokens more ids (the first call; again only if called past them)."""
        ids = torch.empty(1, self.length + max(self.params.max_new_tokens, 0) + 1, dtype=torch.long, device=device)
        ids[:, : self.length] = self.ids.to(device)
        self._ids = ids
