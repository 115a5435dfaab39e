"""Token sampling on the device, with no host synchronisation until the caller reads the token."""
from __future__ import annotations

from typing import Sequence

import torch

from ..config import SamplingParams


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.greedy:
        return None
    gen = torch.Generator(device=device)
    if params.seed is None:
        gen.seed()
    else:
        gen.manual_seed(params.seed)
    return gen


def apply_repeat_penalty(logits: torch.Tensor, recent: torch.Tensor | None, penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor (and llama.cpp's repeat_penalty): each distinct
    token in `recent` once, however often it occurs there; dividing a negative logit would raise it."""
    if recent is None or not recent.numel() or penalty == 1.0:
        return logits
    seen = logits.gather(0, recent)
    # Duplicate ids in `recent` scatter the same value, so the order of the writes does not matter.
    return logits.scatter(0, recent, torch.where(seen > 0, seen / penalty, seen * penalty))


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
           recent: torch.Tensor | None = None) -> torch.Tensor:
    """logits [V] float32 -> token id as a 0-d int64 tensor on the same device. recent: the ids the
    repetition penalty applies to (on the device), before the temperature, as in transformers."""
    if params.penalized:
        logits = apply_repeat_penalty(logits, recent, params.repeat_penalty)
    if params.greedy:
        return logits.argmax()
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the mass before it already reaches top_p (the first token always stays).
        drop = (cum - sorted_logits.softmax(-1)) >= params.top_p
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p, without a host-side multinomial.
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise).argmax()


class Sampler:
    """sample() with its state for one answer: the generator and, for the repetition penalty, the last
    repeat_last_n ids of the context (the prompt's tail, then each token drawn), kept on the device so
    that drawing a token still never waits for the host."""

    def __init__(self, params: SamplingParams, device: torch.device, context: Sequence[int] = ()):
        self.params = params
        self.generator = make_generator(params, device)
        self.recent = None
        if params.penalized:
            self.recent = torch.tensor(list(context)[-params.repeat_last_n:], dtype=torch.long, device=device)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        token = sample(logits, self.params, self.generator, self.recent)
        if self.recent is not None:
            self.recent = torch.cat([self.recent, token.view(1)])[-self.params.repeat_last_n:]
        return token
