"""KL drift: how far tuning moved a model on text its base model writes itself.

The base model writes continuations of prompts (greedy or sampled); both models score them, and the exact
KL(base || model) over the vocabulary is taken at every continuation position (`onsft.formulas.stats`).
"""

from __future__ import annotations

import torch

from onsft.engine.decoding import SamplingConfig, generate
from onsft.errors import UserError
from onsft.formulas.stats import kl_per_position
from onsft.runtime.models import pad_token_id

KL_CONTINUATIONS = ("greedy", "sampled")


def _kl_sums(
    base_model,
    model,
    sequences: list[list[int]],
    prompt_lengths: list[int],
    pad_id: int,
    batch_size: int,
    max_logits: int,
) -> list[tuple[float, int]]:
    """(sum of KL_t, token count) per sequence, over the positions that predict its continuation."""
    vocab = model.get_output_embeddings().weight.shape[0]
    lengths = [len(s) - p for s, p in zip(sequences, prompt_lengths)]
    order = sorted(range(len(sequences)), key=lambda i: -lengths[i])
    out: dict[int, tuple[float, int]] = {}
    start = 0
    while start < len(order):
        # Left padding puts every continuation in the last columns, so only the last `keep` columns
        # need logits; the longest continuation comes first and sets `keep` for its batch.
        keep = lengths[order[start]] + 1
        rows = max(1, min(batch_size, max_logits // (keep * vocab)))
        batch = order[start : start + rows]
        width = max(len(sequences[i]) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, i in enumerate(batch):
            ids[r, width - len(sequences[i]) :] = torch.tensor(sequences[i])
            mask[r, width - len(sequences[i]) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        logits = []
        for net in (base_model, model):
            output = net(
                input_ids=ids.to(net.device),
                attention_mask=mask.to(net.device),
                position_ids=positions.to(net.device),
                use_cache=False,
                logits_to_keep=keep,
            )
            logits.append(output.logits.to(model.device))
        if logits[0].shape[-1] != logits[1].shape[-1]:
            raise UserError(
                f"the base model has {logits[0].shape[-1]} output tokens, the model "
                f"{logits[1].shape[-1]}; KL needs one vocabulary",
                where="--base_model",
                fix="compare a model with the base it was tuned from (same tokenizer).",
            )
        # Kept column j predicts the token in column (width - keep + j + 1): a row's n continuation
        # tokens (its last n columns) are predicted by kept columns keep-1-n .. keep-2.
        kl = kl_per_position(logits[0][:, :-1], logits[1][:, :-1])
        for r, i in enumerate(batch):
            out[i] = (float(kl[r, keep - 1 - lengths[i] :].double().sum()), lengths[i])
        start += len(batch)
    return [out[i] for i in range(len(sequences))]


@torch.inference_mode()
def base_continuations(
    base_model,
    tokenizer,
    prompts_ids: list[list[int]],
    *,
    continuation: str = "greedy",
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
) -> list[list[int]]:
    """The base model's continuations of `prompts_ids` (greedy or sampled), each returned whole: prompt and
    continuation. They depend on the base model only, so many models can be scored on one set of them."""
    if continuation not in KL_CONTINUATIONS:
        raise UserError(f"unknown continuation `{continuation}`", where="kl_drift", fix="use greedy or sampled.")
    sampling = SamplingConfig(
        max_new_tokens=max_new_tokens,
        temperature=0.0 if continuation == "greedy" else temperature,
        seed=seed,
        batch_size=batch_size,
    )
    continuations = generate(base_model, tokenizer, prompts_ids, sampling)
    return [list(p) + list(g.token_ids) for p, g in zip(prompts_ids, continuations)]


@torch.inference_mode()
def kl_on_continuations(
    base_model,
    model,
    tokenizer,
    prompts_ids: list[list[int]],
    sequences: list[list[int]],
    *,
    batch_size: int = 16,
    max_logits: int = 2**27,
) -> tuple[float, list[tuple[float, int]]]:
    """Mean KL(base || model) per continuation token of `sequences` (from `base_continuations`), and
    [(kl_sum, tokens)] per prompt."""
    pad_id = pad_token_id(tokenizer)
    was_training = (base_model.training, model.training)
    base_model.eval()
    model.eval()
    try:
        per_prompt = _kl_sums(
            base_model, model, sequences, [len(p) for p in prompts_ids], pad_id, batch_size, max_logits
        )
    finally:
        base_model.train(was_training[0])
        model.train(was_training[1])
    total = sum(s for s, _ in per_prompt)
    tokens = sum(n for _, n in per_prompt)
    return (total / tokens if tokens else 0.0), per_prompt


def kl_drift(
    base_model,
    model,
    tokenizer,
    prompts_ids: list[list[int]],
    *,
    continuation: str = "greedy",
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    max_logits: int = 2**27,
    return_per_prompt: bool = False,
):
    """Mean over continuation tokens of KL(base || model), on the base model's own continuations of
    `prompts_ids` (greedy or sampled). With `return_per_prompt`, also [(kl_sum, tokens)] per prompt.
    `max_logits` bounds the logits held at once per model (rows x kept positions x vocabulary)."""
    sequences = base_continuations(
        base_model,
        tokenizer,
        prompts_ids,
        continuation=continuation,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        batch_size=batch_size,
    )
    mean, per_prompt = kl_on_continuations(
        base_model, model, tokenizer, prompts_ids, sequences, batch_size=batch_size, max_logits=max_logits
    )
    return (mean, per_prompt) if return_per_prompt else mean
