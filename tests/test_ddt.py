"""DDT formulas pinned against naive float64 references (spec section 1)."""

import math

import pytest
import torch

from onsft.formulas import ddt


def naive(logits: torch.Tensor, targets: torch.Tensor, tau: float = 1.0) -> dict[str, torch.Tensor]:
    """Straight from the definitions, in float64, one row at a time."""
    out = {k: [] for k in ("logp", "entropy", "second_moment", "phi", "var")}
    for row, y in zip(logits.double(), targets.tolist()):
        p = torch.softmax(row / tau, dim=-1)
        logp = torch.log(p)
        entropy = -(p * logp).sum()
        second = (p * logp**2).sum()
        out["logp"].append(logp[y])
        out["entropy"].append(entropy)
        out["second_moment"].append(second)
        out["phi"].append(logp[y] + entropy)
        out["var"].append(second - entropy**2)
    return {k: torch.stack(v) for k, v in out.items()}


def assert_matches(stats: ddt.TokenStats, reference: dict, atol: float) -> None:
    for key, expected in reference.items():
        got = getattr(stats, key).double()
        assert torch.allclose(got, expected, rtol=0, atol=atol), (key, (got - expected).abs().max().item())


def head(n=37, hidden=24, vocab=301, seed=0, dtype=torch.float64, logit_std=3.0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g, dtype=dtype)
    w = torch.randn(vocab, hidden, generator=g, dtype=dtype) * logit_std / math.sqrt(hidden)
    b = torch.randn(vocab, generator=g, dtype=dtype)
    y = torch.randint(0, vocab, (n,), generator=g)
    return h, w, b, y


def test_uniform_logits_give_phi_zero_and_variance_zero():
    vocab = 50
    targets = torch.tensor([0, 7, 49])
    stats = ddt.token_stats(torch.full((3, vocab), 2.5), targets)
    assert torch.allclose(stats.phi, torch.zeros(3), atol=1e-6)
    assert torch.allclose(stats.var, torch.zeros(3), atol=1e-6)
    assert torch.allclose(stats.entropy, torch.full((3,), math.log(vocab)), atol=1e-6)
    # Streamed: every vocabulary row equal means every logit equal.
    weight = torch.ones(vocab, 8) * 0.3
    streamed = ddt.token_stats_from_hidden(torch.randn(3, 8), weight, targets, vocab_chunk=16, row_chunk=2)
    assert torch.allclose(streamed.phi, torch.zeros(3), atol=1e-5)
    assert torch.allclose(streamed.var, torch.zeros(3), atol=1e-5)
    assert torch.allclose(streamed.entropy, torch.full((3,), math.log(vocab)), atol=1e-5)


@pytest.mark.parametrize("tau", [1.0, 0.7, 1.6])
def test_full_logit_stats_match_naive(tau):
    h, w, b, y = head()
    logits = h @ w.T + b
    assert_matches(ddt.token_stats(logits, y, tau), naive(logits, y, tau), atol=1e-10)


def test_phi_is_centered_and_var_is_its_variance_under_p():
    # Exact identities over the whole vocabulary: sum_v p(v) phi(v) = 0, sum_v p(v) phi(v)^2 = Var.
    h, w, b, _ = head(n=5)
    logits = h @ w.T + b
    vocab = logits.shape[1]
    for row in logits:
        every = ddt.token_stats(row.expand(vocab, vocab), torch.arange(vocab), tau=0.8)
        p = torch.softmax(row / 0.8, -1)
        assert abs((p * every.phi).sum().item()) < 1e-12
        assert abs((p * every.phi**2).sum().item() - every.var[0].item()) < 1e-10


@pytest.mark.parametrize("tau", [1.0, 0.7, 1.6])
@pytest.mark.parametrize("row_chunk,vocab_chunk", [(5, 7), (16, 64), (37, 301), (100, 1000), (8, 300)])
def test_streamed_stats_match_naive_float64(tau, row_chunk, vocab_chunk):
    h, w, b, y = head()
    stats = ddt.token_stats_from_hidden(h, w, y, b, tau, vocab_chunk=vocab_chunk, row_chunk=row_chunk)
    assert stats.phi.dtype == torch.float64
    assert_matches(stats, naive(h @ w.T + b, y, tau), atol=1e-10)


@pytest.mark.parametrize("vocab_chunk", [64, 1000, 999])
def test_streamed_float32_matches_float64_to_1e5(vocab_chunk):
    h, w, b, y = head(n=64, hidden=64, vocab=5000, logit_std=4.0)
    stats = ddt.token_stats_from_hidden(h.float(), w.float(), y, b.float(), 0.7, vocab_chunk=vocab_chunk, row_chunk=24)
    assert stats.phi.dtype == torch.float32
    # Against the same float32 logits in float64: what the streaming itself adds to the logits' rounding.
    reference = naive(h.float() @ w.float().T + b.float(), y, 0.7)
    second = reference.pop("second_moment")
    assert_matches(stats, reference, atol=1e-5)
    assert torch.allclose(stats.second_moment.double(), second, rtol=1e-5, atol=1e-5)


def test_several_taus_share_tiles_and_equal_separate_calls():
    h, w, b, y = head()
    together = ddt.token_stats_from_hidden(h, w, y, b, [1.0, 0.5, 2.0], vocab_chunk=50, row_chunk=9)
    for tau, stats in zip([1.0, 0.5, 2.0], together):
        alone = ddt.token_stats_from_hidden(h, w, y, b, tau, vocab_chunk=50, row_chunk=9)
        assert torch.equal(stats.phi, alone.phi) and torch.equal(stats.var, alone.var)


def test_worker_threads_give_bitwise_the_same_stats_and_restore_the_thread_count():
    h, w, b, y = head(n=100, dtype=torch.float32)
    w.requires_grad_(True)  # a model's head weight, called outside no_grad: worker threads must not record
    alone = ddt.token_stats_from_hidden(h, w, y, b, [1.0, 0.7], vocab_chunk=64, row_chunk=16, workers=1)
    threads = torch.get_num_threads()
    pooled = ddt.token_stats_from_hidden(h, w, y, b, [1.0, 0.7], vocab_chunk=64, row_chunk=16, workers=3)
    assert torch.get_num_threads() == threads
    for a, p in zip(alone, pooled):
        assert torch.equal(a.logp, p.logp) and torch.equal(a.entropy, p.entropy) and torch.equal(a.var, p.var)


def test_running_max_rescaling_is_exact_when_the_max_moves_late():
    # Ascending logits put a new maximum in every tile: every rescaling step is exercised, and a large
    # offset would overflow exp() without the running maximum.
    vocab, n = 200, 3
    logits = torch.linspace(-30, 30, vocab, dtype=torch.float64).expand(n, vocab) + 1000.0
    weight = torch.eye(vocab, dtype=torch.float64)  # hidden = logits, weight = identity
    y = torch.tensor([0, 150, 199])
    stats = ddt.token_stats_from_hidden(logits.clone(), weight, y, vocab_chunk=13, row_chunk=2)
    assert_matches(stats, naive(logits, y), atol=1e-10)
    assert torch.isfinite(stats.phi).all()


def test_logit_scale_and_softcap_match_transformed_logits():
    h, w, b, y = head()
    logits = h @ w.T + b
    capped = 5.0 * torch.tanh(logits * 0.5 / 5.0)
    stats = ddt.token_stats_from_hidden(h, w, y, b, 0.9, vocab_chunk=40, row_chunk=10, logit_scale=0.5, softcap=5.0)
    assert_matches(stats, naive(capped, y, 0.9), atol=1e-10)


def test_bfloat16_weights_accumulate_in_float32():
    h, w, b, y = head(dtype=torch.float32)
    stats = ddt.token_stats_from_hidden(h.bfloat16(), w.bfloat16(), y, None, vocab_chunk=64, row_chunk=16)
    assert stats.phi.dtype == torch.float32
    # Same numbers as the full logits a bf16 model would produce (bf16 matmul, then float32 softmax).
    logits = (h.bfloat16() @ w.bfloat16().T).float()
    assert_matches(stats, naive(logits, y), atol=1e-4)


def test_aggregate_responses_matches_hand_computation():
    g = torch.Generator().manual_seed(3)
    lengths = [4, 1, 7]
    phi = -torch.rand(12, generator=g, dtype=torch.float64) * 6 + 0.5
    var = torch.rand(12, generator=g, dtype=torch.float64) * 2
    scores = ddt.aggregate_responses(phi, var, lengths, threshold=-0.1)
    start = 0
    for k, n in enumerate(lengths):
        p, v = phi[start : start + n], var[start : start + n]
        z = p.sum() / v.sum().sqrt()
        assert scores["n_tokens"][k] == n
        assert torch.isclose(scores["sum_phi"][k], p.sum())
        assert torch.isclose(scores["mean_phi"][k], p.mean())
        assert torch.isclose(scores["sum_var"][k], v.sum())
        assert torch.isclose(scores["z"][k], z)
        assert abs(scores["p_value"][k].item() - 0.5 * math.erfc(-z.item() / math.sqrt(2))) < 1e-12
        for level in (-1, -3, -5):
            assert torch.isclose(scores[f"share_phi_gt_{level}"][k], (p > level).double().mean())
        assert bool(scores["ood"][k]) == (p.mean().item() < -0.1)
        start += n
    single = ddt.response_scores(phi[:4], var[:4])
    assert single["n_tokens"] == 4 and isinstance(single["ood"], bool)
    assert abs(single["z"] - scores["z"][0].item()) < 1e-12


def test_p_value_is_one_sided_normal_cdf():
    z = torch.tensor([-1.6448536269514722, 0.0, 1.959963984540054], dtype=torch.float64)
    assert torch.allclose(ddt.p_value(z), torch.tensor([0.05, 0.5, 0.975], dtype=torch.float64), atol=1e-12)


def test_zero_variance_response_has_finite_z():
    scores = ddt.response_scores(torch.zeros(3), torch.zeros(3))
    assert scores["z"] == 0.0 and scores["p_value"] == 0.5


def test_aggregate_rejects_bad_lengths():
    with pytest.raises(ValueError):
        ddt.aggregate_responses(torch.zeros(3), torch.zeros(3), [3, 0])
    with pytest.raises(ValueError):
        ddt.aggregate_responses(torch.zeros(3), torch.zeros(3), [2])


def _check_fused(h, w, b, y):
    for tau in (1.0, 0.6):
        eager = ddt.token_stats_from_hidden(h, w, y, b, tau, vocab_chunk=128, row_chunk=32)
        fused = ddt.token_stats_from_hidden(h, w, y, b, tau, vocab_chunk=128, row_chunk=32, fused=True)
        for key in ("logp", "entropy", "var"):
            assert torch.allclose(getattr(fused, key), getattr(eager, key), atol=1e-5), key
        assert_matches(fused, {k: v for k, v in naive(h @ w.T + b, y, tau).items() if k != "second_moment"}, 1e-5)


def test_fused_tile_formula_matches_eager_and_naive(monkeypatch):
    # The one-expression tile update that torch.compile fuses, run uncompiled: its math, quickly.
    monkeypatch.setattr(ddt, "_compiled_or_none", lambda: ddt._fused_update)
    _check_fused(*head(n=70, hidden=32, vocab=900, dtype=torch.float32))


@pytest.mark.slow
def test_fused_compiled_tiles_match_eager_and_naive():
    # The torch.compile'd kernel itself (audit --compile true); compiling takes 10-40 s on 2 busy cores.
    _check_fused(*head(n=70, hidden=32, vocab=900, dtype=torch.float32))
    assert not ddt._compile_failed
