"""IDFT: one token-weighted NLL whose weighting covers SFT, DFT and IDFT (spec section 2).

Pure tensor functions, no model and no I/O, so tests pin them against float64 references:

    phi_t   = log p_t(y_t) + H(p_t)                                   (DDT centered log-likelihood)
    gamma_t = clip(exp(-sg(phi_t) / beta), gamma_min, gamma_max)       (idft)
            = 0                                                        (nll: plain SFT)
            = 1                                                        (dft: -sg(p) log p)
    gamma_eff = 1 + lambda * (gamma_t - 1)                             (optional schedule: starts as DFT)
    w_t     = sg(p_t(y_t) ** gamma_eff) = sg(exp(gamma_eff * log p))
    loss    = sum_t -w_t log p_t(y_t) / (response tokens in the whole optimiser batch)

Dividing by the optimiser batch's token count (not each micro-batch's) is what makes one big batch and
the same batch in gradient-accumulation micro-batches give the same gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from onsft.errors import UserError

LOSS_TYPES = ("nll", "dft", "idft")


@dataclass
class LossConfig:
    loss: str = field(default="idft", metadata={"help": "Token weighting: nll (plain SFT), dft (weight p) or idft."})
    idft_beta: float = field(default=1.0, metadata={"help": "IDFT temperature beta in gamma = exp(-phi / beta)."})
    gamma_min: float = field(default=0.1, metadata={"help": "Lower clip of IDFT's gamma (tokens the model prefers)."})
    gamma_max: float = field(default=2.0, metadata={"help": "Upper clip of IDFT's gamma (far off-policy tokens)."})
    schedule_start: float = field(
        default=0.0, metadata={"help": "Fraction of training at which IDFT starts to depart from DFT (lambda > 0)."}
    )
    schedule_end: float = field(
        default=0.0,
        metadata={
            "help": "Fraction of training at which lambda reaches 1 (full IDFT). Equal to schedule_start "
            "(the default, 0) means no schedule: IDFT from the first step."
        },
    )

    def validate(self) -> None:
        if self.loss not in LOSS_TYPES:
            raise UserError(f"unknown loss `{self.loss}`", where="config", fix=f"use one of {', '.join(LOSS_TYPES)}.")
        if self.idft_beta <= 0:
            raise UserError("idft_beta must be > 0", where="config", fix="pass a positive --idft_beta.")
        if not 0 <= self.gamma_min <= self.gamma_max:
            raise UserError("need 0 <= gamma_min <= gamma_max", where="config", fix="fix --gamma_min/--gamma_max.")
        if not 0 <= self.schedule_start <= self.schedule_end <= 1:
            raise UserError(
                "need 0 <= schedule_start <= schedule_end <= 1",
                where="config",
                fix="fix --schedule_start/--schedule_end (fractions of total steps).",
            )


def centered_log_likelihood(log_probs: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
    """phi_t = log p(y_t) + H(p_t): zero in expectation when y_t is sampled from p_t."""
    return log_probs + entropy


def idft_gamma(phi: torch.Tensor, beta: float, gamma_min: float, gamma_max: float) -> torch.Tensor:
    # exp(-phi/beta) overflows to inf for phi << 0; the clip makes that harmless (inf -> gamma_max).
    return torch.exp(-phi / beta).clamp(min=gamma_min, max=gamma_max)


def schedule_lambda(step: int, total_steps: int, start: float, end: float) -> float:
    """Linear ramp of lambda from 0 (at start * total) to 1 (at end * total); 1 throughout when start == end."""
    if end <= start or total_steps <= 0:
        return 1.0
    progress = step / total_steps
    return float(min(1.0, max(0.0, (progress - start) / (end - start))))


def token_gamma(
    log_probs: torch.Tensor, entropy: torch.Tensor | None, config: LossConfig, lam: float = 1.0
) -> torch.Tensor:
    """The exponent gamma_t of each token's weight p^gamma: the single place where SFT, DFT and IDFT differ."""
    if config.loss == "nll":
        return torch.zeros_like(log_probs)
    if config.loss == "dft":
        return torch.ones_like(log_probs)
    if entropy is None:
        raise ValueError("idft needs the per-token entropy")
    phi = centered_log_likelihood(log_probs.detach(), entropy.detach())
    gamma = idft_gamma(phi, config.idft_beta, config.gamma_min, config.gamma_max)
    return 1.0 + lam * (gamma - 1.0)


def token_weights(log_probs: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """w_t = sg(p_t(y_t) ** gamma_t), computed in log space (p ** 0 = 1 even where p underflows)."""
    return torch.exp(gamma * log_probs.detach())


def weighted_nll_sum(log_probs: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_t -w_t log p_t over unmasked tokens. `where` (not multiply) so a -inf on a masked token gives no NaN."""
    return torch.where(mask, -weights * log_probs, torch.zeros_like(log_probs)).sum()


def normalise(loss_sum: torch.Tensor, num_tokens: torch.Tensor | int) -> torch.Tensor:
    """Divide by the optimiser batch's token count; a batch with no trainable token is a finite zero."""
    return loss_sum / torch.as_tensor(num_tokens, device=loss_sum.device).clamp(min=1)


def idft_loss(
    log_probs: torch.Tensor,
    entropy: torch.Tensor | None,
    mask: torch.Tensor,
    config: LossConfig,
    lam: float = 1.0,
    num_tokens: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """Mean weighted NLL of one (micro-)batch, normalised by `num_tokens` (defaults to this batch's count)."""
    gamma = token_gamma(log_probs, entropy, config, lam)
    total = weighted_nll_sum(log_probs, token_weights(log_probs, gamma), mask)
    return normalise(total, mask.sum() if num_tokens is None else num_tokens)


@torch.no_grad()
def weighting_stats(
    log_probs: torch.Tensor, entropy: torch.Tensor | None, mask: torch.Tensor, config: LossConfig, lam: float = 1.0
) -> dict[str, torch.Tensor]:
    """Sums over unmasked tokens of what shows IDFT at work (divide by `count` to get means)."""
    gamma = token_gamma(log_probs, entropy, config, lam)
    weights = token_weights(log_probs, gamma)
    m = mask.float()
    stats = {
        "count": m.sum(),
        "nll": (-log_probs * m).nan_to_num().sum(),
        "weighted": (-weights * log_probs * m).nan_to_num().sum(),
        "gamma": (gamma * m).sum(),
        "weight": (weights * m).sum(),
    }
    if entropy is not None:
        stats["phi"] = (centered_log_likelihood(log_probs, entropy) * m).nan_to_num().sum()
    if config.loss == "idft":
        raw = idft_gamma(
            centered_log_likelihood(log_probs, entropy), config.idft_beta, config.gamma_min, config.gamma_max
        )
        stats["at_gamma_min"] = ((raw <= config.gamma_min) * m).sum()
        stats["at_gamma_max"] = ((raw >= config.gamma_max) * m).sum()
    return stats
