"""Sampling rules and the repetition stop rule: pure functions of log-probabilities and token lists.

Temperature, top-k and top-p filtering (`filter_logprobs`, applied in the order transformers applies
them), one draw per row from a per-example random stream (`sample_tokens`, `example_generator`: what an
example samples depends only on (seed, its index), never on the batch it is decoded in), and the
reference code's degenerate-loop rule (`has_repeated_window` and its incremental form).
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Protocol

import torch

NUCLEUS_CANDIDATES = 256  # top-p looks among this many most likely tokens before sorting everything


class SamplingRule(Protocol):
    """What `sample_tokens` reads from a sampling configuration (`onsft.engine.decoding.SamplingConfig`)."""

    temperature: float
    top_k: int
    top_p: float


def filter_logprobs(
    logprobs: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """Temperature, then top-k, then top-p (the order `transformers` applies them) over the last dim.

    Input may be unnormalised (a geometric mixture); output is normalised log-probs with the removed
    tokens at -inf. Temperature must be > 0 here; greedy decoding is an argmax and never calls this.
    """
    if temperature <= 0:
        raise ValueError("filter_logprobs needs temperature > 0; use argmax for greedy decoding")
    scores = torch.log_softmax(logprobs.float() / temperature, dim=-1)
    vocab = scores.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        # Renormalised so the nucleus below is measured within the top k, as transformers does.
        scores = torch.log_softmax(scores.masked_fill(scores < kth, float("-inf")), dim=-1)
    if top_p < 1.0:
        # The nucleus is usually a few tokens: look for it among the most likely candidates and sort
        # the whole vocabulary only when some row's candidates hold less than top_p.
        candidates = min(vocab, NUCLEUS_CANDIDATES)
        ordered, order = torch.topk(scores, candidates, dim=-1)
        if candidates < vocab and not bool((ordered.exp().sum(-1) >= top_p).all()):
            ordered, order = torch.sort(scores, dim=-1, descending=True)
        probs = ordered.exp()
        mass_before = torch.cumsum(probs, dim=-1) - probs
        # Keep a token while the mass of strictly more likely tokens is below top_p: the smallest
        # prefix reaching top_p, and never less than the single most likely token.
        keep_sorted = mass_before < top_p
        keep_sorted[..., 0] = True
        keep = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, order, keep_sorted)
        scores = scores.masked_fill(~keep, float("-inf"))
    return torch.log_softmax(scores, dim=-1)


def example_generator(seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The random stream of example `index`: fixed by (seed, index) alone, so batch size and order do
    not change what an example samples."""
    # A multiplicative (golden-ratio) mix keeps streams of neighbouring seeds and indices apart.
    mixed = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 1) % (2**63 - 1)
    generator = torch.Generator(device=device)
    generator.manual_seed(mixed)
    return generator


def sample_tokens(logprobs: torch.Tensor, config: SamplingRule, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row of `logprobs` [N, V] (unnormalised is fine): argmax when temperature is 0,
    else a draw from the filtered distribution by inverse CDF with one uniform from row i's own
    generator (one batched search instead of N multinomial calls)."""
    if config.temperature == 0:
        return torch.argmax(logprobs, dim=-1)
    probs = filter_logprobs(logprobs, config.temperature, config.top_k, config.top_p).exp()
    uniforms = torch.cat([torch.rand(1, generator=g, device=g.device, dtype=probs.dtype) for g in generators])
    cdf = torch.cumsum(probs, dim=-1)
    # The first token whose cumulative mass exceeds u * total: token v with probability p_v / total.
    target = (uniforms.to(probs.device) * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_max(probs.shape[-1] - 1)


def has_repeated_window(tokens: list[int], window: int, count: int) -> bool:
    """True when some run of `window` consecutive tokens occurs at least `count` times (overlaps count).
    The naive statement of the rule; `RepetitionDetector` is its incremental form."""
    if count <= 0 or len(tokens) < window:
        return False
    seen = Counter(tuple(tokens[i : i + window]) for i in range(len(tokens) - window + 1))
    return max(seen.values()) >= count


class RepetitionDetector:
    """Incremental `has_repeated_window`: `push` one token at a time, O(window) per token.

    The reference code scans the whole output every 100 tokens; checking at each token stops a loop
    as soon as it qualifies instead of up to 99 tokens later.
    """

    def __init__(self, window: int, count: int):
        self.window, self.count = window, count
        self.recent: deque[int] = deque(maxlen=window)
        self.seen: Counter[tuple[int, ...]] = Counter()

    def push(self, token: int) -> bool:
        if self.count <= 0:
            return False
        self.recent.append(token)
        if len(self.recent) < self.window:
            return False
        key = tuple(self.recent)
        self.seen[key] += 1
        return self.seen[key] >= self.count
