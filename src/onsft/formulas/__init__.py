"""Pure tensor math of on-policy SFT, tensor in, tensor out (the documented public API of the formulas).

    from onsft.formulas import token_stats, aggregate_responses, token_gamma, mixing_weight

- DDT (`ddt`): phi = log p(y) + H, its on-policy variance, Z and the one-sided p-value per response.
- Token weighting (`weighting`): gamma of SFT (0), DFT (1) and IDFT (exp(-phi/beta), clipped), EAFT's
  top-K entropy weight, ASFT's KL term, the loss.
- Tiled LM head (`tiled_head`): EAFT's top-K entropy and ASFT's KL to a reference (with its gradient) from
  hidden states, streamed over vocabulary tiles.
- Hinted decoding (`mixing`): lambda from the hinted context's entropy, the geometric mixture.
- Sampling (`sampling`) and statistics (`stats`: pass@k, KL, KS distance, quantiles).
"""

from onsft.formulas.ddt import TokenStats, aggregate_responses, p_value, token_stats, token_stats_from_hidden
from onsft.formulas.mixing import mix_logprobs, mixing_weight, normalized_entropy
from onsft.formulas.sampling import example_generator, filter_logprobs, sample_tokens
from onsft.formulas.stats import kl_per_position, ks_distance_to_normal, pass_at_k, quantile
from onsft.formulas.tiled_head import HeadTiles, kl_from_hidden, top_k_entropy, top_k_entropy_from_hidden
from onsft.formulas.weighting import (
    LossConfig,
    centered_log_likelihood,
    eaft_weight,
    idft_gamma,
    idft_loss,
    schedule_lambda,
    token_gamma,
    token_weight,
    token_weights,
)

__all__ = [
    "HeadTiles",
    "LossConfig",
    "TokenStats",
    "aggregate_responses",
    "centered_log_likelihood",
    "eaft_weight",
    "example_generator",
    "filter_logprobs",
    "idft_gamma",
    "idft_loss",
    "kl_from_hidden",
    "kl_per_position",
    "ks_distance_to_normal",
    "mix_logprobs",
    "mixing_weight",
    "normalized_entropy",
    "p_value",
    "pass_at_k",
    "quantile",
    "sample_tokens",
    "schedule_lambda",
    "token_gamma",
    "token_stats",
    "token_stats_from_hidden",
    "token_weight",
    "token_weights",
    "top_k_entropy",
    "top_k_entropy_from_hidden",
]
