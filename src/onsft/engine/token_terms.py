"""The per-token terms EAFT and ASFT add to what TRL's fused head returns (log p(y) and H): the top-K entropy
of the model's next-token distribution, and the KL from the frozen starting model.

Both come from the last hidden states the backbone computes anyway in the fused forward (a forward hook on
the backbone keeps them, with their graph) and the LM head's weights, through the tiled functions of
`onsft.formulas.tiled_head`, at the response positions only: no [batch, length, vocabulary] logits exist.
"""

from __future__ import annotations

import contextlib
import copy

import torch

from onsft.engine.scoring import head_transform
from onsft.formulas.tiled_head import HeadTiles, kl_from_hidden, top_k_entropy_from_hidden


def causal_lm(model, accelerator):
    """The transformers model inside the accelerate (DDP, ...) and PEFT wrappers."""
    model = accelerator.unwrap_model(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def head_tiles(model, row_chunk: int, vocab_chunk: int) -> HeadTiles:
    scale, softcap = head_transform(model.config)
    return HeadTiles(scale, softcap, row_chunk, vocab_chunk)


@contextlib.contextmanager
def last_hidden_states(model):
    """Keep the backbone's last hidden states [batch, length, H] of the forward run inside the block (TRL's
    fused forward calls `model.base_model`, looked up at call time, so the hook goes on that module)."""
    kept: dict[str, torch.Tensor] = {}

    def hook(module, args, output):
        kept["hidden"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    handle = model.base_model.register_forward_hook(hook)
    try:
        yield kept
    finally:
        handle.remove()


def response_rows(hidden: torch.Tensor, mask: torch.Tensor, inputs: dict) -> torch.Tensor:
    """The hidden states [n, H] that predict the unmasked labels, in `mask`'s row-major order (TRL's head
    pairs position t with label t + 1, or with shift_labels[t] when those are given pre-shifted)."""
    states = hidden if inputs.get("shift_labels") is not None else hidden[:, :-1]
    return states[mask.to(states.device)]


def scatter(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token values [n] back to the mask's shape, zero elsewhere (differentiable)."""
    return values.new_zeros(mask.shape).masked_scatter(mask.to(values.device), values)


def top_k_entropy(model, hidden: torch.Tensor, mask: torch.Tensor, k: int, tiles: HeadTiles) -> torch.Tensor:
    """H_K at every unmasked position (no gradient: EAFT's weight is detached)."""
    head = model.get_output_embeddings()
    bias = None if head.bias is None else head.bias.detach()
    return scatter(top_k_entropy_from_hidden(hidden.detach(), head.weight.detach(), k, bias, tiles), mask)


class StartingModel:
    """The frozen starting model that ASFT's KL anchors to. With LoRA it is the trained model with its adapters
    disabled (as TRL's DPO does: no second copy); otherwise a frozen copy taken before the first step (a
    resumed run builds it from the same base model, before the checkpoint's weights are loaded)."""

    def __init__(self, model, accelerator):
        self.accelerator = accelerator
        unwrapped = accelerator.unwrap_model(model)
        self.peft = hasattr(unwrapped, "disable_adapter")
        self.copy = None
        if not self.peft:
            self.copy = copy.deepcopy(unwrapped).eval().requires_grad_(False)

    def kl(self, model, hidden: torch.Tensor, mask: torch.Tensor, inputs: dict, tiles: HeadTiles) -> torch.Tensor:
        """KL(p_ref || p) at every unmasked position, with gradient to `hidden` and the trained head."""
        trained = causal_lm(model, self.accelerator)
        reference = self.copy if self.copy is not None else trained
        kwargs = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels", "num_items_in_batch")}
        disabled = self.accelerator.unwrap_model(model).disable_adapter() if self.peft else contextlib.nullcontext()
        with torch.no_grad(), disabled:
            ref_out = reference.base_model(**{**kwargs, "use_cache": False})
            ref_hidden = response_rows(ref_out.last_hidden_state, mask, inputs)
            ref_head = reference.get_output_embeddings()
            # Under LoRA a wrapped head's `weight` is its frozen base weight: the starting model's.
            ref_weight, ref_bias = ref_head.weight.detach(), ref_head.bias
        head = trained.get_output_embeddings()
        ref_tiles = head_tiles(reference, tiles.row_chunk, tiles.vocab_chunk)
        kl = kl_from_hidden(hidden, head.weight, ref_hidden, ref_weight, head.bias, ref_bias, tiles, ref_tiles)
        return scatter(kl, mask)
