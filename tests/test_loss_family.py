"""EAFT and ASFT (spec section 5) pinned against naive float64 full-logit formulas: the streamed top-K entropy,
the tiled KL and its gradient, and both losses' values and gradients (peaked and flat rows, padding,
accumulation)."""

import math

import pytest
import torch

from onsft.errors import UserError
from onsft.formulas.tiled_head import HeadTiles, kl_from_hidden, top_k_entropy_from_hidden
from onsft.formulas.weighting import LossConfig, eaft_weight, idft_loss, token_gamma, weighting_stats

F64 = torch.float64
# Tilings: several vocabulary tiles of uneven width, a tile narrower than K, one tile for everything.
TILINGS = [HeadTiles(row_chunk=3, vocab_chunk=7), HeadTiles(row_chunk=2, vocab_chunk=5), HeadTiles(vocab_chunk=1000)]


def full_logits(hidden, weight, bias=None, scale=1.0, softcap=None):
    """The naive reference: every logit at once, in float64."""
    z = (hidden @ weight.T + (0 if bias is None else bias)) * scale
    return softcap * torch.tanh(z / softcap) if softcap else z


def naive_top_k_entropy(logits, k):
    top = logits.detach().topk(k, dim=-1).values
    q = torch.softmax(top, -1)
    return -(q * torch.log(q)).nan_to_num().sum(-1)


def naive_kl(logits, ref_logits):
    """KL(p_ref || p) = sum p_ref (log p_ref - log p) over the whole vocabulary."""
    log_p, log_ref = torch.log_softmax(logits, -1), torch.log_softmax(ref_logits.detach(), -1)
    return (log_ref.exp() * (log_ref - log_p)).sum(-1)


def rows(n=9, hidden=6, vocab=23, seed=0):
    """Hidden states and a head whose rows include a flat one (all logits equal) and a peaked one."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g, dtype=F64) * 2
    w = torch.randn(vocab, hidden, generator=g, dtype=F64)
    b = torch.randn(vocab, generator=g, dtype=F64)
    h[0] = 0.0  # flat row (without bias): every logit 0
    h[1] = w[5] * 40  # peaked row: token 5 far ahead
    return h, w, b


@pytest.mark.parametrize("tiles", TILINGS)
@pytest.mark.parametrize("k", [2, 5, 20])
def test_streamed_top_k_entropy_equals_full_top_k(tiles, k):
    h, w, b = rows()
    for bias, scale, softcap in [(None, 1.0, None), (b, 0.5, None), (b, 1.0, 3.0)]:
        t = HeadTiles(scale, softcap, tiles.row_chunk, tiles.vocab_chunk)
        ours = top_k_entropy_from_hidden(h, w, k, bias, t)
        ref = naive_top_k_entropy(full_logits(h, w, bias, scale, softcap), k)
        assert ours.dtype == F64
        assert torch.allclose(ours, ref, rtol=0, atol=1e-12)
    flat_and_peaked = top_k_entropy_from_hidden(h[:2], w, k, None, tiles)
    assert flat_and_peaked[0].item() == pytest.approx(math.log(k), abs=1e-12)  # K equal logits: ln K
    assert flat_and_peaked[1].item() < 1e-12  # one token holds (almost) all of the top-K mass


def test_top_k_needs_k_within_the_vocabulary():
    h, w, _ = rows()
    with pytest.raises(ValueError, match="K <= vocabulary"):
        top_k_entropy_from_hidden(h, w, 24)


@pytest.mark.parametrize("tiles", TILINGS)
def test_tiled_kl_equals_full_kl_to_1e_10(tiles):
    h, w, b = rows()
    g = torch.Generator().manual_seed(1)
    h_ref = torch.randn(h.shape[0], 4, generator=g, dtype=F64) * 2  # another width: the reference's own
    w_ref = torch.randn(w.shape[0], 4, generator=g, dtype=F64)
    h_ref[1] = w_ref[11] * 40  # peaked on another token than the model's peaked row
    for bias, scale, softcap in [(None, 1.0, None), (b, 0.7, None), (b, 1.0, 4.0)]:
        t = HeadTiles(scale, softcap, tiles.row_chunk, tiles.vocab_chunk)
        ours = kl_from_hidden(h, w, h_ref, w_ref, bias, None, t, HeadTiles())
        ref = naive_kl(full_logits(h, w, bias, scale, softcap), full_logits(h_ref, w_ref))
        assert torch.allclose(ours, ref, rtol=0, atol=1e-10)
        assert ours[1].item() > 10  # the two peaked rows disagree: a large KL, still exact
    # The model against itself: zero.
    same = kl_from_hidden(h, w, h, w, b, b, tiles)
    assert same.abs().max().item() < 1e-12


@pytest.mark.parametrize("tiles", TILINGS)
def test_tiled_kl_gradient_equals_full_gradient(tiles):
    h, w, b = rows()
    h_ref, w_ref, b_ref = (t + 0.3 * torch.randn_like(t) for t in rows(seed=5))
    upstream = torch.rand(h.shape[0], dtype=F64)  # a weighted sum exercises the per-row factor
    for scale, softcap in [(1.0, None), (0.7, 2.5)]:
        t = HeadTiles(scale, softcap, tiles.row_chunk, tiles.vocab_chunk)
        leaves = [x.clone().requires_grad_() for x in (h, w, b)]
        ours = (kl_from_hidden(leaves[0], leaves[1], h_ref, w_ref, leaves[2], b_ref, t) * upstream).sum()
        g_ours = torch.autograd.grad(ours, leaves)
        ref_leaves = [x.clone().requires_grad_() for x in (h, w, b)]
        # Same architecture, so the reference's logits get the same scale and cap (`ref_tiles` defaults to these).
        ref_logits = full_logits(h_ref, w_ref, b_ref, scale, softcap)
        ref = (naive_kl(full_logits(*ref_leaves, scale, softcap), ref_logits) * upstream).sum()
        g_ref = torch.autograd.grad(ref, ref_leaves)
        assert abs(ours.item() - ref.item()) < 1e-10
        for a, r in zip(g_ours, g_ref):
            assert torch.allclose(a, r, rtol=0, atol=1e-10)


def test_tiled_kl_gradcheck_and_frozen_reference():
    g = torch.Generator().manual_seed(2)
    h, w, b = (torch.randn(*s, generator=g, dtype=F64, requires_grad=True) for s in ((4, 3), (9, 3), (9,)))
    h_ref, w_ref = torch.randn(4, 3, generator=g, dtype=F64), torch.randn(9, 3, generator=g, dtype=F64)
    tiles = HeadTiles(softcap=3.0, row_chunk=3, vocab_chunk=4)
    assert torch.autograd.gradcheck(lambda *x: kl_from_hidden(x[0], x[1], h_ref, w_ref, x[2], None, tiles), (h, w, b))
    # The reference gets no gradient even when its tensors could take one.
    h_ref.requires_grad_()
    kl_from_hidden(h, w, h_ref, w_ref, b, None, tiles).sum().backward()
    assert h_ref.grad is None and h.grad is not None


# ----------------------------------------------------------------------------------------- the losses


def batch(seed=0, B=3, T=6, hidden=5, vocab=23):
    """Hidden states [B, T, H] with a flat and a peaked position, labels, a padding mask, a reference."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, hidden, generator=g, dtype=F64) * 2
    w = torch.randn(vocab, hidden, generator=g, dtype=F64)
    labels = torch.randint(0, vocab, (B, T), generator=g)
    h[0, 1] = 0.0  # flat: every logit 0
    h[0, 2] = w[labels[0, 2]] * 30  # peaked on its label
    h[1, 0] = w[(labels[1, 0] + 1) % vocab] * 30  # peaked against its label: a confident conflict
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0, :3] = True
    mask[1, 0] = True
    mask[2, -2:] = False  # padding at the end of a row
    h_ref = h + 0.5 * torch.randn(h.shape, generator=g, dtype=F64)
    w_ref = w + 0.2 * torch.randn(w.shape, generator=g, dtype=F64)
    return h, w, labels, mask, h_ref, w_ref


SMALL_TILES = HeadTiles(row_chunk=4, vocab_chunk=6)


def ours(h, w, labels, mask, h_ref, w_ref, config, num_tokens=None, tiles=SMALL_TILES):
    """What the trainer computes: log p from the head (TRL's part), H_K / KL from the tiled functions at the
    unmasked positions only, scattered back to [B, T]."""
    log_probs = torch.log_softmax(h @ w.T, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    top_k = kl = None
    if config.loss == "eaft":
        flat = top_k_entropy_from_hidden(h[mask].detach(), w.detach(), config.eaft_top_k, None, tiles)
        top_k = torch.zeros(mask.shape, dtype=F64).masked_scatter(mask, flat)
    if config.loss == "asft":
        flat = kl_from_hidden(h[mask], w, h_ref[mask], w_ref, None, None, tiles)
        kl = torch.zeros(mask.shape, dtype=F64).masked_scatter(mask, flat)
    return idft_loss(log_probs, None, mask, config, num_tokens=num_tokens, top_k_entropy=top_k, kl=kl)


def naive(h, w, labels, mask, h_ref, w_ref, config, num_tokens=None):
    """Full float64 logits everywhere; sg() parts from a detached copy."""
    logits = h @ w.T
    log_p = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    if config.loss == "eaft":
        weight = (naive_top_k_entropy(logits, config.eaft_top_k) / math.log(config.eaft_top_k)) ** config.eaft_alpha
        per_token = -weight * log_p
    else:
        per_token = -log_p.detach().exp() * log_p + config.asft_alpha * naive_kl(logits, h_ref @ w_ref.T)
    count = mask.sum() if num_tokens is None else num_tokens
    return (per_token * mask).sum() / count


CONFIGS = [
    LossConfig(loss="eaft"),
    LossConfig(loss="eaft", eaft_top_k=5, eaft_alpha=0.5),
    LossConfig(loss="eaft", eaft_top_k=3, eaft_alpha=2.0),
    LossConfig(loss="asft"),
    LossConfig(loss="asft", asft_alpha=1.5),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.loss}")
def test_loss_value_and_gradient_match_naive_full_logits(config):
    h, w, labels, mask, h_ref, w_ref = batch()
    a = [h.clone().requires_grad_(), w.clone().requires_grad_()]
    b = [h.clone().requires_grad_(), w.clone().requires_grad_()]
    mine = ours(*a, labels, mask, h_ref, w_ref, config)
    ref = naive(*b, labels, mask, h_ref, w_ref, config)
    assert abs(mine.item() - ref.item()) < 1e-10
    for x, y in zip(torch.autograd.grad(mine, a), torch.autograd.grad(ref, b)):
        assert torch.allclose(x, y, rtol=0, atol=1e-10)


@pytest.mark.parametrize("config", CONFIGS[::2], ids=lambda c: c.loss)
def test_padding_positions_get_no_gradient_and_garbage_there_changes_nothing(config):
    h, w, labels, mask, h_ref, w_ref = batch()
    leaf = h.clone().requires_grad_()
    loss = ours(leaf, w, labels, mask, h_ref, w_ref, config)
    (grad,) = torch.autograd.grad(loss, leaf)
    assert torch.all(grad[~mask] == 0) and grad[mask].abs().sum() > 0
    # NaN hidden states on padded positions (never read: only masked rows reach the tiled functions).
    poisoned = torch.where(mask[..., None], h, torch.full_like(h, math.nan))
    assert ours(poisoned, w, labels, mask, h_ref, w_ref, config).item() == pytest.approx(loss.item(), abs=1e-14)


@pytest.mark.parametrize("config", CONFIGS[::2], ids=lambda c: c.loss)
def test_micro_batches_equal_one_batch(config):
    h, w, labels, mask, h_ref, w_ref = batch()
    leaf = w.clone().requires_grad_()
    whole = ours(h, leaf, labels, mask, h_ref, w_ref, config)
    (g_whole,) = torch.autograd.grad(whole, leaf)
    total, parts, grads = mask.sum(), 0.0, torch.zeros_like(w)
    for r in ([0], [1, 2]):
        part_leaf = w.clone().requires_grad_()
        part = ours(h[r], part_leaf, labels[r], mask[r], h_ref[r], w_ref, config, num_tokens=total)
        parts += part.item()
        grads += torch.autograd.grad(part, part_leaf)[0]
    assert parts == pytest.approx(whole.item(), abs=1e-12)
    assert torch.allclose(grads, g_whole, rtol=0, atol=1e-12)


def test_eaft_weight_reading():
    k = 20
    h = torch.tensor([0.0, math.log(k) / 2, math.log(k)], dtype=F64)
    assert eaft_weight(h, k, 1.0).tolist() == pytest.approx([0.0, 0.5, 1.0])
    assert eaft_weight(h, k, 2.0).tolist() == pytest.approx([0.0, 0.25, 1.0])
    assert eaft_weight(h, k, 0.0).tolist() == [1.0, 1.0, 1.0]  # alpha = 0 is plain SFT
    with pytest.raises(ValueError, match="top-K entropy"):
        token_gamma(torch.zeros(2), None, LossConfig(loss="eaft"))
    assert token_gamma(torch.zeros(2), None, LossConfig(loss="asft")).tolist() == [1.0, 1.0]  # DFT's weight


def test_stats_report_top_k_entropy_and_kl():
    h, w, labels, mask, h_ref, w_ref = batch()
    log_p = torch.log_softmax(h @ w.T, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    top_k = naive_top_k_entropy(h @ w.T, 20)
    kl = naive_kl(h @ w.T, h_ref @ w_ref.T)
    eaft = weighting_stats(log_p, None, mask, LossConfig(loss="eaft"), top_k_entropy=top_k)
    assert "gamma" not in eaft
    assert eaft["top_k_entropy"].item() == pytest.approx(top_k[mask].sum().item())
    assert eaft["weight"].item() == pytest.approx((top_k[mask] / math.log(20)).sum().item())
    asft = weighting_stats(log_p, None, mask, LossConfig(loss="asft"), kl=kl)
    assert asft["kl"].item() == pytest.approx(kl[mask].sum().item()) and asft["gamma"].item() == mask.sum().item()


@pytest.mark.parametrize(
    "change,message",
    [({"eaft_top_k": 1}, "eaft_top_k"), ({"eaft_alpha": -1.0}, "eaft_alpha"), ({"asft_alpha": math.nan}, "asft_alpha")],
)
def test_bad_knobs_are_user_errors(change, message):
    with pytest.raises(UserError, match=message):
        LossConfig(loss="eaft", **change).validate()
