"""One token-weighted NLL whose weighting covers SFT, DFT, IDFT (spec section 2), EAFT and ASFT (section 5).

Pure tensor functions, no model and no I/O, so tests pin them against float64 references:

    phi_t   = log p_t(y_t) + H(p_t)                                   (DDT centered log-likelihood)
    gamma_t = clip(exp(-sg(phi_t) / beta), gamma_min, gamma_max)       (idft)
            = 0                                                        (nll: plain SFT)
            = 1                                                        (dft and asft: -sg(p) log p)
    gamma_eff = 1 + lambda * (gamma_t - 1)                             (optional schedule: starts as DFT)
    w_t     = sg(p_t(y_t) ** gamma_eff) = sg(exp(gamma_eff * log p))   (nll, dft, idft, asft)
            = sg((H_K(p_t) / ln K) ** alpha_eaft)                      (eaft: H_K the entropy of the top-K
                                                                        next-token probabilities renormalised)
    loss    = sum_t [-w_t log p_t(y_t) + alpha_asft KL(p_ref,t || p_t)] / (response tokens in the whole
              optimiser batch)                                         (the KL term for asft only)

Dividing by the optimiser batch's token count (not each micro-batch's) is what makes one big batch and
the same batch in gradient-accumulation micro-batches give the same gradient. H_K and the KL come from
`onsft.formulas.tiled_head` (streamed over vocabulary tiles); here they are per-token inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from onsft.errors import UserError
from onsft.formulas.ddt import centered_log_likelihood

LOSS_TYPES = ("nll", "dft", "idft", "eaft", "asft")


@dataclass
class LossConfig:
    loss: str = field(
        default="idft",
        metadata={
            "help": "Token weighting: nll (plain SFT), dft (weight p), idft, eaft (weight (H_K / ln K)^alpha, "
            "entropy-adaptive) or asft (dft plus alpha * KL(starting model || model) per token, anchored)."
        },
    )
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

    eaft_top_k: int = field(
        default=20,
        metadata={
            "help": "EAFT: K of the top-K next-token probabilities whose renormalised entropy H_K weighs a token."
        },
    )
    eaft_alpha: float = field(
        default=1.0, metadata={"help": "EAFT: exponent alpha of the weight (H_K / ln K)^alpha (0 = plain SFT)."}
    )
    asft_alpha: float = field(
        default=0.1,
        metadata={"help": "ASFT: weight alpha of the per-token KL(starting model || model) added to the DFT loss."},
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
        if self.eaft_top_k < 2:
            raise UserError(
                "eaft_top_k must be >= 2 (H_K is divided by ln K)", where="config", fix="pass --eaft_top_k 20."
            )
        for name in ("eaft_alpha", "asft_alpha"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise UserError(f"{name} must be a finite number >= 0", where="config", fix=f"fix --{name}.")


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
    """The exponent gamma_t of each token's weight p^gamma: where SFT, DFT (and ASFT's DFT part) and IDFT differ.
    EAFT's weight is not a power of p (see `token_weight`)."""
    if config.loss == "nll":
        return torch.zeros_like(log_probs)
    if config.loss in ("dft", "asft"):
        return torch.ones_like(log_probs)
    if config.loss == "eaft":
        raise ValueError("eaft weighs tokens by their top-K entropy, not by a power of p: use token_weight")
    if entropy is None:
        raise ValueError("idft needs the per-token entropy")
    phi = centered_log_likelihood(log_probs.detach(), entropy.detach())
    gamma = idft_gamma(phi, config.idft_beta, config.gamma_min, config.gamma_max)
    return 1.0 + lam * (gamma - 1.0)


def token_weights(log_probs: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """w_t = sg(p_t(y_t) ** gamma_t), computed in log space (p ** 0 = 1 even where p underflows)."""
    return torch.exp(gamma * log_probs.detach())


def eaft_weight(top_k_entropy: torch.Tensor, k: int, alpha: float) -> torch.Tensor:
    """sg((H_K / ln K) ** alpha): ~0 where the model is sure of its top choice, 1 where its K best are equal.
    (LLaMA-Factory divides by 3.0, ~ln 20; ln K is the exact maximum of H_K.) The clip only guards rounding."""
    return (top_k_entropy.detach() / math.log(k)).clamp(0.0, 1.0) ** alpha


def token_weight(
    log_probs: torch.Tensor,
    entropy: torch.Tensor | None,
    config: LossConfig,
    lam: float = 1.0,
    top_k_entropy: torch.Tensor | None = None,
) -> torch.Tensor:
    """The detached weight w_t of each token's NLL, for every loss type: the single place where they differ."""
    if config.loss == "eaft":
        if top_k_entropy is None:
            raise ValueError("eaft needs the per-token top-K entropy")
        return eaft_weight(top_k_entropy, config.eaft_top_k, config.eaft_alpha)
    return token_weights(log_probs, token_gamma(log_probs, entropy, config, lam))


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum over unmasked positions; `where` (not multiply) so garbage (inf, NaN) on masked positions stays out."""
    return torch.where(mask, values, torch.zeros_like(values)).sum()


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
    top_k_entropy: torch.Tensor | None = None,
    kl: torch.Tensor | None = None,
) -> torch.Tensor:
    """The loss of one (micro-)batch for any loss type, normalised by `num_tokens` (defaults to this batch's
    count): the weighted NLL, plus asft_alpha * KL (per token, with its gradient) for asft."""
    weights = token_weight(log_probs, entropy, config, lam, top_k_entropy)
    total = weighted_nll_sum(log_probs, weights, mask)
    if config.loss == "asft":
        if kl is None:
            raise ValueError("asft needs the per-token KL to the starting model")
        total = total + config.asft_alpha * masked_sum(kl, mask)
    return normalise(total, mask.sum() if num_tokens is None else num_tokens)


@torch.no_grad()
def weighting_stats(
    log_probs: torch.Tensor,
    entropy: torch.Tensor | None,
    mask: torch.Tensor,
    config: LossConfig,
    lam: float = 1.0,
    top_k_entropy: torch.Tensor | None = None,
    kl: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Sums over unmasked tokens of what shows the weighting at work (divide by `count` to get means)."""
    weights = token_weight(log_probs, entropy, config, lam, top_k_entropy)
    m = mask.float()
    stats = {
        "count": m.sum(),
        "nll": (-log_probs * m).nan_to_num().sum(),
        "weighted": (-weights * log_probs * m).nan_to_num().sum(),
        "weight": (weights * m).sum(),
    }
    if config.loss != "eaft":
        stats["gamma"] = (token_gamma(log_probs, entropy, config, lam) * m).sum()
    if top_k_entropy is not None:
        stats["top_k_entropy"] = masked_sum(top_k_entropy.detach(), mask)
    if kl is not None:
        stats["kl"] = masked_sum(kl.detach(), mask)
    if entropy is not None:
        stats["phi"] = (centered_log_likelihood(log_probs, entropy) * m).nan_to_num().sum()
    if config.loss == "idft":
        raw = idft_gamma(
            centered_log_likelihood(log_probs, entropy), config.idft_beta, config.gamma_min, config.gamma_max
        )
        stats["at_gamma_min"] = ((raw <= config.gamma_min) * m).sum()
        stats["at_gamma_max"] = ((raw >= config.gamma_max) * m).sum()
    return stats
