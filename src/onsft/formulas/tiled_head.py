"""What EAFT and ASFT need beyond TRL's fused head (which gives log p(y) and H only), computed from the last
hidden states and the LM head in vocabulary tiles, so no [N, V] logits ever exist.

Logits are z = transform(h @ W.T + b) (`ddt.transform_logits`: a scale, then an optional soft cap), one
[rows, vocab_chunk] tile at a time, in float32 (float64 when the inputs are float64), autocast off.

EAFT's top-K entropy (no gradient: EAFT's weight is detached). A running top-K of each row is merged with
each tile's own top-K; at the end, q = softmax over the K largest logits and

    H_K = -sum_{j <= K} q_j log q_j        (0 for a one-hot row, ln K when the K best logits are equal).

ASFT's anchor, per row, KL(p_ref || p) = sum_v p_ref(v) (log p_ref(v) - log p(v)) with gradient to the
trained model's hidden states, LM head weight and bias (the reference is frozen). One pass over the tiles
keeps online log-sum-exp sums of both models and the reference-weighted logit gap, each relative to its
running maximum m (rescaled by e^(m_old - m_new) when the maximum rises):

    S = sum e^(z - m),   S_ref = sum e^(z_ref - m_ref),   G = sum e^(z_ref - m_ref) (z_ref - z)
    KL = G / S_ref - log Z_ref + log Z,   log Z = m + log S

The gradient of KL with respect to the logits z is p - p_ref; the backward pass recomputes both tiles from
the saved log Z's and folds (p - p_ref) * dKL into the hidden states' and the head's gradients, tile by
tile (through the soft cap: dz/draw = scale * (1 - (z / cap)^2)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from onsft.formulas.ddt import accumulation_dtype, default_chunks, transform_logits


@dataclass(frozen=True)
class HeadTiles:
    """How logits are made from hidden states (scale, soft cap) and the tile shape they are made in.
    Chunks of 0 mean `ddt.default_chunks` of the device."""

    logit_scale: float = 1.0
    softcap: float | None = None
    row_chunk: int = 0
    vocab_chunk: int = 0

    def chunks(self, device: torch.device) -> tuple[int, int]:
        rows, vocab = default_chunks(device)
        return self.row_chunk or rows, self.vocab_chunk or vocab


def _dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, accumulation_dtype(t.dtype))
    return dtype


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, v0: int, v1: int, tiles: HeadTiles):
    """One [rows, v1 - v0] tile of transformed logits in h's dtype (h already in the accumulation dtype)."""
    w = weight[v0:v1].to(h.dtype)
    raw = h @ w.T if bias is None else torch.addmm(bias[v0:v1].to(h.dtype), h, w.T)
    return transform_logits(raw, tiles.logit_scale, tiles.softcap)


def top_k_entropy(top_logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax over the last dimension (the K largest logits of a row): H_K."""
    logq = torch.log_softmax(top_logits, dim=-1)
    return -(logq.exp() * logq).sum(-1)


@torch.no_grad()
def top_k_entropy_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    k: int,
    bias: torch.Tensor | None = None,
    tiles: HeadTiles = HeadTiles(),
) -> torch.Tensor:
    """H_K of each row of `hidden` [N, H] under the head `weight` [V, H] (+ `bias`), streamed over the
    vocabulary: [N], in the accumulation dtype. Needs 1 <= k <= V."""
    vocab = weight.shape[0]
    if not 1 <= k <= vocab:
        raise ValueError(f"top-K needs 1 <= K <= vocabulary size ({vocab}), got K = {k}")
    dtype = _dtype(hidden, weight)
    row_chunk, vocab_chunk = tiles.chunks(weight.device)
    out = torch.empty(hidden.shape[0], dtype=dtype, device=weight.device)
    with torch.autocast(weight.device.type, enabled=False):
        for r0 in range(0, hidden.shape[0], row_chunk):
            h = hidden[r0 : r0 + row_chunk].to(device=weight.device, dtype=dtype)
            best = None
            for v0 in range(0, vocab, vocab_chunk):
                z = _logits(h, weight, bias, v0, min(v0 + vocab_chunk, vocab), tiles)
                # The tile's own K best first (one pass over the tile), then a merge of at most 2K columns.
                top = z.topk(min(k, z.shape[1]), dim=-1, sorted=False).values
                merged = top if best is None else torch.cat([best, top], dim=-1)
                best = merged if merged.shape[1] <= k else merged.topk(k, dim=-1, sorted=False).values
            out[r0 : r0 + row_chunk] = top_k_entropy(best)
    return out


def _kl_block(h, weight, bias, hr, ref_weight, ref_bias, tiles, ref_tiles, vocab_chunk):
    """(KL, log Z, log Z_ref) of one block of rows, one pass over the vocabulary (module docstring)."""
    vocab = weight.shape[0]
    rows = h.shape[0]
    m = torch.full((rows,), -math.inf, dtype=h.dtype, device=h.device)
    m_ref = m.clone()
    s, s_ref, gap = (torch.zeros(rows, dtype=h.dtype, device=h.device) for _ in range(3))
    for v0 in range(0, vocab, vocab_chunk):
        v1 = min(v0 + vocab_chunk, vocab)
        z = _logits(h, weight, bias, v0, v1, tiles)
        z_ref = _logits(hr, ref_weight, ref_bias, v0, v1, ref_tiles)
        m_new = torch.maximum(m, z.amax(-1))
        s = s * (m - m_new).exp() + (z - m_new[:, None]).exp().sum(-1)
        m = m_new
        m_ref_new = torch.maximum(m_ref, z_ref.amax(-1))
        scale = (m_ref - m_ref_new).exp()
        e_ref = (z_ref - m_ref_new[:, None]).exp()
        s_ref = s_ref * scale + e_ref.sum(-1)
        gap = gap * scale + (e_ref * (z_ref - z)).sum(-1)
        m_ref = m_ref_new
    log_z, log_z_ref = m + s.log(), m_ref + s_ref.log()
    return gap / s_ref - log_z_ref + log_z, log_z, log_z_ref


class _TiledKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, tiles, ref_tiles):
        dtype = _dtype(hidden, weight, ref_hidden, ref_weight)
        device = weight.device
        row_chunk, vocab_chunk = tiles.chunks(device)
        n = hidden.shape[0]
        kl, log_z, log_z_ref = (torch.empty(n, dtype=dtype, device=device) for _ in range(3))
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            for r0 in range(0, n, row_chunk):
                rows = slice(r0, r0 + row_chunk)
                h = hidden[rows].to(device=device, dtype=dtype)
                hr = ref_hidden[rows].to(device=device, dtype=dtype)
                kl[rows], log_z[rows], log_z_ref[rows] = _kl_block(
                    h, weight, bias, hr, ref_weight, ref_bias, tiles, ref_tiles, vocab_chunk
                )
        ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, log_z, log_z_ref)
        ctx.tiles, ctx.ref_tiles = tiles, ref_tiles
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, log_z, log_z_ref = ctx.saved_tensors
        tiles, ref_tiles = ctx.tiles, ctx.ref_tiles
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dtype, device = log_z.dtype, weight.device
        row_chunk, vocab_chunk = tiles.chunks(device)
        vocab = weight.shape[0]
        grad_h = torch.zeros(hidden.shape, dtype=dtype, device=device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=dtype, device=device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=dtype, device=device) if need_b else None
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            for r0 in range(0, hidden.shape[0], row_chunk):
                rows = slice(r0, r0 + row_chunk)
                h = hidden[rows].to(device=device, dtype=dtype)
                hr = ref_hidden[rows].to(device=device, dtype=dtype)
                g = grad_kl[rows].to(dtype)[:, None]
                for v0 in range(0, vocab, vocab_chunk):
                    v1 = min(v0 + vocab_chunk, vocab)
                    z = _logits(h, weight, bias, v0, v1, tiles)
                    z_ref = _logits(hr, ref_weight, ref_bias, v0, v1, ref_tiles)
                    dz = ((z - log_z[rows, None]).exp() - (z_ref - log_z_ref[rows, None]).exp()) * g
                    if tiles.softcap:
                        dz = dz * (1 - (z / tiles.softcap).square())
                    if tiles.logit_scale != 1.0:
                        dz = dz * tiles.logit_scale
                    if need_h:
                        grad_h[rows] += dz @ weight[v0:v1].to(dtype)
                    if need_w:
                        grad_w[v0:v1] += dz.T @ h
                    if need_b:
                        grad_b[v0:v1] += dz.sum(0)
        cast = [
            None if grad is None else grad.to(device=like.device, dtype=like.dtype)
            for grad, like in ((grad_h, hidden), (grad_w, weight), (grad_b, bias))
        ]
        return (*cast, None, None, None, None, None)


def kl_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    tiles: HeadTiles = HeadTiles(),
    ref_tiles: HeadTiles | None = None,
) -> torch.Tensor:
    """KL(p_ref || p) per row [N] between the reference's next-token distribution (hidden states `ref_hidden`
    [N, H_ref], head `ref_weight` [V, H_ref]) and the trained model's (`hidden` [N, H], `weight` [V, H]),
    differentiable in hidden, weight and bias (not in the reference). `ref_tiles` (default `tiles`) gives the
    reference's logit scale and soft cap; the tile shape is `tiles`'."""
    if weight.shape[0] != ref_weight.shape[0] or hidden.shape[0] != ref_hidden.shape[0]:
        raise ValueError(
            f"need the same vocabulary and rows, got heads {tuple(weight.shape)} / {tuple(ref_weight.shape)} "
            f"and hidden states {tuple(hidden.shape)} / {tuple(ref_hidden.shape)}"
        )
    ref = (ref_hidden.detach(), ref_weight.detach(), None if ref_bias is None else ref_bias.detach())
    return _TiledKL.apply(hidden, weight, bias, *ref, tiles, ref_tiles or tiles)
