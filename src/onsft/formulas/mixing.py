"""The hinted-decoding mixing rule (spec section 3): lambda_t from the hinted context's entropy, and the
geometric mixture of the two contexts' next-token log-probabilities.

    lambda_t = clip(beta * H(softmax l_h) / log|V|, 0, 1)      (mode 'linear'; see `mixing_weight`)
    mixed    = (1 - lambda_t) * l_h + lambda_t * l_p

Pure tensor functions, tested against float64 references; `onsft.engine.hinted` wires them into decoding.
"""

from __future__ import annotations

import math

import torch

MODES = ("linear", "sigmoid", "piecewise")


def normalized_entropy(logprobs: torch.Tensor) -> torch.Tensor:
    """H(softmax(logprobs)) / log|V| over the last dim, in [0, 1]. Input must be normalised log-probs
    (a log_softmax); -inf entries (probability 0) contribute 0."""
    probs = logprobs.exp()
    # 0 * -inf is nan; clamping the log at the dtype's minimum makes those terms exactly 0.
    entropy = -(probs * logprobs.clamp_min(torch.finfo(logprobs.dtype).min)).sum(dim=-1)
    return entropy / math.log(logprobs.shape[-1])


def mixing_weight(
    hinted_logprobs: torch.Tensor,
    beta: float,
    mode: str = "linear",
    *,
    sigmoid_center: float = 0.5,
    piecewise_low: float = 0.3,
    piecewise_high: float = 0.7,
) -> torch.Tensor:
    """lambda_t, the plain context's weight, from the hinted distribution's normalised entropy h.

    - 'linear':    clip(beta * h, 0, 1). beta = 0 keeps the hinted context alone (self-distillation);
                   lambda reaches 1 (plain alone) at h = 1/beta.
    - 'sigmoid':   sigmoid(beta * (h - sigmoid_center)): a smooth version whose midpoint is the centre
                   and whose steepness is beta. Never exactly 0 or 1, so the plain context always has a
                   say; beta = 0 gives a constant 1/2.
    - 'piecewise': 0 for h <= piecewise_low, 1 for h >= piecewise_high, linear between: a dead zone in
                   which a confident hinted context leads alone. beta is not used.
    The two non-linear modes are the reference code's definitions, with its defaults (0.5; 0.3, 0.7).
    Returns a tensor of the leading shape of `hinted_logprobs` (last dim reduced).
    """
    h = normalized_entropy(hinted_logprobs)
    if mode == "linear":
        return torch.clamp(beta * h, 0.0, 1.0)
    if mode == "sigmoid":
        return torch.sigmoid(beta * (h - sigmoid_center))
    if mode == "piecewise":
        if not piecewise_low < piecewise_high:
            raise ValueError("piecewise mode needs piecewise_low < piecewise_high")
        return torch.clamp((h - piecewise_low) / (piecewise_high - piecewise_low), 0.0, 1.0)
    raise ValueError(f"unknown mixing mode {mode!r}; expected one of {MODES}")


def mix_logprobs(
    hinted_logprobs: torch.Tensor, plain_logprobs: torch.Tensor, lam: torch.Tensor | float
) -> torch.Tensor:
    """(1 - lam) * l_h + lam * l_p per row (lam broadcasts over the last dim): the log of the geometric
    mixture p_h^(1-lam) p_p^lam, NOT normalised; apply log_softmax (or sample, which does) after.
    lam = 0 and lam = 1 return exactly l_h and l_p, even where the other one is -inf."""
    lam = torch.as_tensor(lam, dtype=hinted_logprobs.dtype, device=hinted_logprobs.device)
    lam = lam.unsqueeze(-1) if lam.dim() else lam
    mixed = (1 - lam) * hinted_logprobs + lam * plain_logprobs
    mixed = torch.where(lam == 0, hinted_logprobs, mixed)
    return torch.where(lam == 1, plain_logprobs, mixed)
