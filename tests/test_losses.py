"""IDFT loss pinned against naive float64 formulas (spec section 2)."""

import math

import pytest
import torch

from onsft.formulas.weighting import (
    LossConfig,
    centered_log_likelihood,
    idft_gamma,
    idft_loss,
    schedule_lambda,
    token_gamma,
    weighting_stats,
)

torch.manual_seed(0)


def naive_loss(logits, labels, mask, beta=1.0, gmin=0.1, gmax=2.0, lam=1.0, fixed_gamma=None):
    """Reference: full-vocabulary float64 softmax; sg() parts use a detached copy of the logits."""
    frozen = logits.detach()
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    p_frozen = torch.softmax(frozen, -1)
    entropy = -(p_frozen * torch.log_softmax(frozen, -1)).sum(-1)
    logp_frozen = torch.log_softmax(frozen, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    phi = logp_frozen + entropy
    if fixed_gamma is None:
        gamma = torch.clamp(torch.exp(-phi / beta), gmin, gmax)
        gamma = 1 + lam * (gamma - 1)
    else:
        gamma = torch.full_like(phi, fixed_gamma)
    weight = torch.exp(logp_frozen) ** gamma
    per_token = -weight * logp
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def stats_from_logits(logits, labels):
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


@pytest.fixture
def batch():
    B, T, V = 3, 7, 11
    logits = (torch.randn(B, T, V, dtype=torch.float64) * 3).requires_grad_()
    labels = torch.randint(0, V, (B, T))
    mask = torch.rand(B, T) > 0.3
    mask[0, 0] = True
    return logits, labels, mask


def test_gamma_zero_is_nll_and_gamma_one_is_dft(batch):
    logits, labels, mask = batch
    logp, entropy = stats_from_logits(logits, labels)
    nll = -(logp * mask).sum() / mask.sum()
    dft = -(logp.exp().detach() * logp * mask).sum() / mask.sum()
    # IDFT with the clip pinning gamma at 0 / 1 is exactly NLL / DFT.
    as_nll = idft_loss(logp, entropy, mask, LossConfig(loss="idft", gamma_min=0.0, gamma_max=0.0))
    as_dft = idft_loss(logp, entropy, mask, LossConfig(loss="idft", gamma_min=1.0, gamma_max=1.0))
    assert abs(as_nll.item() - nll.item()) < 1e-6
    assert abs(as_dft.item() - dft.item()) < 1e-6
    assert abs(idft_loss(logp, entropy, mask, LossConfig(loss="nll")).item() - nll.item()) < 1e-6
    assert abs(idft_loss(logp, entropy, mask, LossConfig(loss="dft")).item() - dft.item()) < 1e-6
    # And the gradients agree too, not only the values.
    g1 = torch.autograd.grad(as_dft, logits, retain_graph=True)[0]
    g2 = torch.autograd.grad(dft, logits)[0]
    assert torch.allclose(g1, g2, atol=1e-10)


@pytest.mark.parametrize("beta,lam", [(1.0, 1.0), (0.5, 1.0), (2.0, 0.3)])
def test_idft_value_and_gradient_match_naive_full_logits(batch, beta, lam):
    logits, labels, mask = batch
    config = LossConfig(loss="idft", idft_beta=beta)
    logp, entropy = stats_from_logits(logits, labels)
    ours = idft_loss(logp, entropy, mask, config, lam=lam)
    ref = naive_loss(logits, labels, mask, beta=beta, lam=lam)
    assert abs(ours.item() - ref.item()) < 1e-10
    g_ours = torch.autograd.grad(ours, logits)[0]
    g_ref = torch.autograd.grad(ref, logits)[0]
    assert torch.allclose(g_ours, g_ref, atol=1e-10)


def test_gradcheck_of_the_weighted_nll():
    # With the sg() parts held fixed, the loss is smooth in the logits: analytic == numerical gradient.
    V = 5
    labels = torch.tensor([[1, 3, 0]])
    mask = torch.tensor([[True, True, False]])
    frozen = torch.randn(1, 3, V, dtype=torch.float64) * 2
    flogp, fent = stats_from_logits(frozen, labels)
    gamma = token_gamma(flogp, fent, LossConfig(loss="idft"))
    weights = torch.exp(gamma * flogp)

    def f(logits):
        logp = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        return (torch.where(mask, -weights * logp, 0.0)).sum() / mask.sum()

    assert torch.autograd.gradcheck(f, (frozen.clone().requires_grad_(),))


def test_masked_tokens_contribute_nothing(batch):
    logits, labels, mask = batch
    logp, entropy = stats_from_logits(logits, labels)
    config = LossConfig(loss="idft")
    base = idft_loss(logp, entropy, mask, config)
    # Garbage (even -inf / NaN) on masked positions changes neither the value nor the gradient.
    poisoned = torch.where(mask, logp, torch.full_like(logp, -math.inf))
    poisoned_h = torch.where(mask, entropy, torch.full_like(entropy, math.nan))
    other = idft_loss(poisoned, poisoned_h, mask, config)
    assert torch.equal(base, other)
    g1 = torch.autograd.grad(base, logits, retain_graph=True)[0]
    g2 = torch.autograd.grad(other, logits)[0]
    assert torch.equal(g1, g2)
    assert torch.all(g1[~mask] == 0)


def test_micro_batches_equal_one_batch(batch):
    logits, labels, mask = batch
    config = LossConfig(loss="idft")
    logp, entropy = stats_from_logits(logits, labels)
    whole = idft_loss(logp, entropy, mask, config)
    g_whole = torch.autograd.grad(whole, logits)[0]
    total = mask.sum()
    parts, grads = [], []
    for rows in ([0], [1, 2]):
        lg = logits.detach()[rows].clone().requires_grad_()
        lp, en = stats_from_logits(lg, labels[rows])
        part = idft_loss(lp, en, mask[rows], config, num_tokens=total)
        parts.append(part.item())
        grads.append(torch.autograd.grad(part, lg)[0])
    assert abs(sum(parts) - whole.item()) < 1e-12
    assert torch.allclose(torch.cat(grads), g_whole, atol=1e-14)


def test_no_trainable_token_is_a_finite_zero():
    logp = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    loss = idft_loss(logp, torch.rand(2, 4, dtype=torch.float64), torch.zeros(2, 4, dtype=torch.bool), LossConfig())
    assert loss.item() == 0.0 and torch.isfinite(loss)
    loss.backward()
    assert torch.all(logp.grad == 0)


def test_gamma_reading_of_phi():
    phi = torch.tensor([-20.0, -1.0, 0.0, 1.0, 20.0], dtype=torch.float64)
    g = idft_gamma(phi, beta=1.0, gamma_min=0.1, gamma_max=2.0)
    # far off-policy -> capped at 2 (small weight); on-policy -> 1 (DFT); preferred -> toward 0 (SFT).
    assert g.tolist() == pytest.approx([2.0, 2.0, 1.0, math.exp(-1.0), 0.1])


def test_schedule_starts_as_dft_and_ramps_linearly():
    assert schedule_lambda(0, 100, 0.1, 0.5) == 0.0
    assert schedule_lambda(10, 100, 0.1, 0.5) == 0.0
    assert schedule_lambda(30, 100, 0.1, 0.5) == pytest.approx(0.5)
    assert schedule_lambda(80, 100, 0.1, 0.5) == 1.0
    assert schedule_lambda(0, 100, 0.0, 0.0) == 1.0  # no schedule
    logp = torch.log(torch.tensor([0.01, 0.5]))
    entropy = torch.tensor([0.3, 0.9])
    # lambda = 0: every token's gamma is 1, i.e. DFT.
    assert torch.allclose(token_gamma(logp, entropy, LossConfig(), lam=0.0), torch.ones(2))


def test_weighting_stats_report_clip_shares():
    logp = torch.log(torch.tensor([[1e-6, 0.9, 0.5]]))
    entropy = torch.tensor([[0.1, 0.1, 3.5]])
    mask = torch.tensor([[True, True, True]])
    stats = weighting_stats(logp, entropy, mask, LossConfig())
    phi = centered_log_likelihood(logp, entropy)
    assert stats["count"].item() == 3
    assert stats["phi"].item() == pytest.approx(phi.sum().item(), rel=1e-6)
    assert stats["at_gamma_max"].item() == 1  # the 1e-6 token
    assert stats["at_gamma_min"].item() == 1  # phi = log .5 + 3.5 = 2.8 -> exp(-2.8) < 0.1
