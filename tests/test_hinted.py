"""Hinted decoding (spec section 3) pinned against float64 formulas, `model.generate`, and a naive
one-example-at-a-time, uncached implementation of the reference algorithm."""

import math

import pytest
import torch

from onsft.engine.hinted import HintedConfig, answer_markers, hinted_decode
from onsft.errors import UserError
from onsft.formulas.mixing import mix_logprobs, mixing_weight, normalized_entropy
from onsft.formulas.sampling import example_generator, filter_logprobs, has_repeated_window
from test_generation import TOKENIZER, encode, hf_greedy, varied_model

QUESTIONS = ["what is 2+2?", "x", "name a colour", "sum 1 to 10 please, step by step"]
REFERENCES = ["4", "the answer is y because of z", "red", "(1+10)*10/2 = 55"]
PLAIN = [encode(q) for q in QUESTIONS]
HINTED = [
    TOKENIZER.apply_chat_template(
        [
            {"role": "system", "content": "Rewrite the reference in your own words."},
            {"role": "user", "content": f"{q}\nReference: {r}"},
        ],
        add_generation_prompt=True,
        tokenize=True,
    )["input_ids"]
    for q, r in zip(QUESTIONS, REFERENCES)
]


def config(**overrides) -> HintedConfig:
    base = dict(max_new_tokens=30, temperature=0.0, beta=1.5, answer_marker="", repetition_count=0, seed=3)
    return HintedConfig(**{**base, **overrides})


# --- pure functions --------------------------------------------------------------------------


def naive_lambda(logits, beta, mode="linear", center=0.5, low=0.3, high=0.7):
    p = torch.softmax(logits.double(), -1)
    h = float(-(p * torch.log(p)).sum() / math.log(len(p)))
    if mode == "linear":
        return min(max(beta * h, 0.0), 1.0)
    if mode == "sigmoid":
        return 1 / (1 + math.exp(-beta * (h - center)))
    return min(max((h - low) / (high - low), 0.0), 1.0)


@pytest.mark.parametrize("mode", ["linear", "sigmoid", "piecewise"])
def test_mixing_weight_matches_float64_formula(mode):
    torch.manual_seed(0)
    # Scales from nearly uniform to nearly one-hot, so every branch of each mode is reached.
    logits = torch.randn(64, 500) * torch.logspace(-2, 1.5, 64).unsqueeze(1)
    lp = torch.log_softmax(logits, -1)
    for beta in (0.0, 0.7, 3.0, 12.0):
        got = mixing_weight(lp, beta, mode)
        want = torch.tensor([naive_lambda(row, beta, mode) for row in logits], dtype=torch.float64)
        assert got.shape == (64,)
        assert torch.allclose(got.double(), want, atol=2e-6)
    lam = mixing_weight(lp, 3.0, mode)
    if mode != "sigmoid":
        assert (lam == 0).any() or mode == "linear"
        assert (lam == 1).any()


def test_uniform_hinted_logits_give_beta_clipped():
    lp = torch.log_softmax(torch.zeros(3, 1000), -1)
    assert torch.allclose(normalized_entropy(lp), torch.ones(3), atol=1e-6)
    for beta in (0.0, 0.25, 0.6, 1.0, 3.0):
        assert torch.allclose(mixing_weight(lp, beta), torch.full((3,), min(beta, 1.0)), atol=1e-6)
    # A one-hot hinted distribution (zero entropy, -inf entries) gives lambda = 0 and no nan.
    onehot = torch.full((1, 50), -math.inf)
    onehot[0, 7] = 0.0
    assert mixing_weight(onehot, 3.0).item() == 0.0


def test_mix_logprobs_is_the_geometric_mixture():
    torch.manual_seed(1)
    l_h, l_p = torch.log_softmax(torch.randn(5, 20), -1), torch.log_softmax(torch.randn(5, 20), -1)
    lam = torch.tensor([0.0, 0.2, 0.5, 0.9, 1.0])
    mixed = mix_logprobs(l_h, l_p, lam)
    want = (1 - lam.double()[:, None]) * l_h.double() + lam.double()[:, None] * l_p.double()
    assert torch.allclose(mixed.double(), want, atol=1e-6)
    assert torch.equal(mixed[0], l_h[0]) and torch.equal(mixed[4], l_p[4])
    # Renormalised, it is p_h^(1-lam) p_p^lam / Z.
    geo = l_h.double().exp() ** (1 - lam.double()[:, None]) * l_p.double().exp() ** lam.double()[:, None]
    assert torch.allclose(torch.softmax(mixed.double(), -1), geo / geo.sum(-1, keepdim=True), atol=1e-6)
    # Endpoints ignore the other side entirely, even an -inf there.
    l_h_inf = l_h.clone()
    l_h_inf[:, 3] = -math.inf
    assert torch.equal(mix_logprobs(l_h_inf, l_p, torch.ones(5))[:, 3], l_p[:, 3])
    assert torch.equal(mix_logprobs(l_h, l_p, 0.0), l_h)


# --- naive reference implementation ------------------------------------------------------------


@torch.no_grad()
def naive_hinted(model, plain, hinted, cfg: HintedConfig, index: int):
    """The reference algorithm as the spec states it: one example, no cache, both contexts recomputed
    from scratch every step, float64."""
    generator = example_generator(cfg.seed, index)
    tokens, lambdas, handed_over = [], [], False
    for step in range(cfg.max_new_tokens):
        l_p = torch.log_softmax(model(torch.tensor([plain + tokens])).logits[0, -1].double(), -1)
        if handed_over:
            mixed, lam = l_p, 1.0
        else:
            l_h = torch.log_softmax(model(torch.tensor([hinted + tokens])).logits[0, -1].double(), -1)
            lam = 0.0 if step == 0 else naive_lambda(l_h, cfg.beta)
            mixed = (1 - lam) * l_h + lam * l_p
        if cfg.temperature == 0:
            token = int(mixed.argmax())
        else:
            probs = filter_logprobs(mixed, cfg.temperature, cfg.top_k, cfg.top_p).exp()
            # Inverse CDF with one uniform per step from the example's stream, as documented.
            u = float(torch.rand(1, generator=generator, dtype=probs.dtype))
            token = int((probs.cumsum(0) <= u * probs.sum()).sum())
        tokens.append(token)
        lambdas.append(lam)
        if token == 1:
            break
        if any(marker in TOKENIZER.decode(tokens) for marker in answer_markers(cfg.answer_marker or "")):
            handed_over = True
    return tokens, lambdas


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_batched_cached_decoding_matches_naive_reference(temperature):
    model = varied_model(seed=0, head_scale=40.0)
    cfg = config(temperature=temperature, top_p=0.95, max_new_tokens=25)
    got = hinted_decode(model, TOKENIZER, PLAIN, HINTED, cfg)
    mixed_steps = 0
    for i, result in enumerate(got):
        tokens, lambdas = naive_hinted(model, PLAIN[i], HINTED[i], cfg, i)
        assert result.token_ids == tokens
        assert result.mean_lambda == pytest.approx(sum(lambdas) / len(lambdas), abs=1e-9)
        assert result.hinted_led_steps == sum(lam < 0.5 for lam in lambdas)
        assert result.hinted_led_steps + result.plain_led_steps == result.n_tokens
        mixed_steps += sum(0 < lam < 1 for lam in lambdas)
    # Not a degenerate case: many steps really mix the two contexts.
    assert mixed_steps > 20


def test_beta_zero_greedy_reproduces_generate_on_hinted_context():
    model = varied_model(seed=1)
    got = hinted_decode(model, TOKENIZER, PLAIN, HINTED, config(beta=0.0, max_new_tokens=40))
    for i, result in enumerate(got):
        assert result.token_ids == hf_greedy(model, HINTED[i], 40)
        assert result.mean_lambda == 0.0 and result.plain_led_steps == 0


def test_lambda_one_reproduces_generate_on_plain_context():
    model = varied_model(seed=1)
    got = hinted_decode(model, TOKENIZER, PLAIN, HINTED, config(lambda_override=1.0, max_new_tokens=40))
    plain = [hf_greedy(model, p, 40) for p in PLAIN]
    assert [r.token_ids for r in got] == plain
    assert all(r.mean_lambda == 1.0 and r.hinted_led_steps == 0 for r in got)
    # And it is the hinted context that changes the text when it leads.
    assert [r.token_ids for r in hinted_decode(model, TOKENIZER, PLAIN, HINTED, config(beta=0.0))] != [
        p[:30] for p in plain
    ]


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_batched_equals_one_at_a_time_and_uncached(temperature):
    model = varied_model(seed=2, head_scale=40.0)
    cfg = config(temperature=temperature, top_p=0.9, answer_marker="e", max_new_tokens=20)
    results = hinted_decode(model, TOKENIZER, PLAIN, HINTED, cfg)
    whole = [r.token_ids for r in results]
    # Some rows hand over to the plain context mid-batch ("e" is generated), others do not.
    assert 0 < sum(r.handed_over for r in results) < len(results)
    for variant in (dict(batch_size=1), dict(batch_size=3), dict(use_cache=False)):
        other = hinted_decode(model, TOKENIZER, PLAIN, HINTED, HintedConfig(**{**cfg.__dict__, **variant}))
        assert [r.token_ids for r in other] == whole, variant


def test_seeded_sampling_is_reproducible():
    model = varied_model(seed=2, head_scale=10.0)
    cfg = config(temperature=1.0, top_p=1.0)
    first = [r.token_ids for r in hinted_decode(model, TOKENIZER, PLAIN, HINTED, cfg)]
    assert first == [r.token_ids for r in hinted_decode(model, TOKENIZER, PLAIN, HINTED, cfg)]
    assert first != [
        r.token_ids for r in hinted_decode(model, TOKENIZER, PLAIN, HINTED, config(temperature=1.0, seed=4))
    ]


def test_answer_marker_hands_over_to_plain_context():
    model = varied_model(seed=0)
    free = [r.token_ids for r in hinted_decode(model, TOKENIZER, PLAIN, HINTED, config(beta=0.0))]
    # Build a marker from example 3's hinted-only text ("SHOXk..."): its tokens 1-2, "HO".
    target, cut = 3, 3
    marker = TOKENIZER.decode(free[target][cut - 2 : cut])
    assert marker not in TOKENIZER.decode(free[target][: cut - 1])
    others = [i for i in range(len(PLAIN)) if i != target]
    assert all(marker not in TOKENIZER.decode(free[i]) for i in others)

    got = hinted_decode(model, TOKENIZER, PLAIN, HINTED, config(beta=0.0, answer_marker=marker))
    result = got[target]
    assert result.handed_over and result.handover_step == cut
    assert result.token_ids[:cut] == free[target][:cut]
    # After the marker the plain context alone continues the shared text, exactly as plain greedy would.
    assert result.token_ids[cut:] == hf_greedy(model, PLAIN[target] + free[target][:cut], 30 - cut)
    assert result.token_ids[cut:] != free[target][cut:]
    assert result.hinted_led_steps == cut and result.plain_led_steps == 30 - cut
    assert result.mean_lambda == pytest.approx((30 - cut) / 30)
    # The other rows of the batch are untouched by one row leaving.
    for i in others:
        assert got[i].token_ids == free[i] and not got[i].handed_over


def test_several_answer_markers_hand_over_at_the_first_one_generated():
    model = varied_model(seed=0)
    free = [r.token_ids for r in hinted_decode(model, TOKENIZER, PLAIN, HINTED, config(beta=0.0))]
    # Two markers, each the text of tokens 1-2 of one example's hinted-only output.
    cuts = {}
    for i in range(len(PLAIN)):
        marker = TOKENIZER.decode(free[i][1:3])
        if marker not in TOKENIZER.decode(free[i][:2]) and "|" not in marker:
            cuts[marker] = i
    (first, a), (second, b) = list(cuts.items())[:2]
    both = hinted_decode(model, TOKENIZER, PLAIN, HINTED, config(beta=0.0, answer_marker=f"{first}|{second}"))
    for marker in (first, second):
        alone = hinted_decode(model, TOKENIZER, PLAIN, HINTED, config(beta=0.0, answer_marker=marker))
        for i in range(len(PLAIN)):
            # Where only this marker occurs (before the other one would), both settings agree token for token.
            if alone[i].handed_over and (not both[i].handed_over or both[i].handover_step == alone[i].handover_step):
                assert both[i].token_ids == alone[i].token_ids
    assert both[a].handed_over and both[a].handover_step <= 3
    assert both[b].handed_over and both[b].handover_step <= 3
    # "" between separators is no marker: "|" alone never hands over.
    never = hinted_decode(model, TOKENIZER, PLAIN, HINTED, config(beta=0.0, answer_marker="|"))
    assert [r.token_ids for r in never] == free and not any(r.handed_over for r in never)
    assert answer_markers("\\boxed{|answer is") == ("\\boxed{", "answer is") and answer_markers("") == ()


def test_marker_before_stop_masks_eos_only_while_the_hinted_context_leads():
    model = varied_model(seed=0)
    free = hinted_decode(model, TOKENIZER, PLAIN, HINTED, config(max_new_tokens=40))
    assert free[0].finish_reason == "eos" and free[0].n_tokens == 9  # this model stops example 0 early
    eos = TOKENIZER.eos_token_id
    # A marker that is never generated: example 0 cannot stop, so it runs to its limit; up to the masked EOS
    # it decodes as before, and the examples that never chose EOS are unchanged.
    held = hinted_decode(
        model, TOKENIZER, PLAIN, HINTED, config(max_new_tokens=40, answer_marker="@@", marker_before_stop=True)
    )
    assert held[0].finish_reason == "length" and held[0].n_tokens == 40 and eos not in held[0].token_ids
    assert held[0].token_ids[:8] == free[0].token_ids[:8] and not held[0].handed_over
    assert [r.token_ids for r in held[1:]] == [r.token_ids for r in free[1:]]
    # A marker generated before the EOS: the hand-over comes first and the plain context may stop as it likes,
    # so the flag changes nothing.
    marker = TOKENIZER.decode(free[0].token_ids[1:3])
    assert marker not in TOKENIZER.decode(free[0].token_ids[:2])
    marked = [config(max_new_tokens=40, answer_marker=marker, marker_before_stop=flag) for flag in (False, True)]
    plain_end, held_end = (hinted_decode(model, TOKENIZER, PLAIN, HINTED, c) for c in marked)
    assert held_end[0].handed_over and held_end[0].handover_step == 3
    assert [r.token_ids for r in held_end] == [r.token_ids for r in plain_end]
    # Without any marker there is nothing to wait for: the flag is off.
    unmarked = hinted_decode(model, TOKENIZER, PLAIN, HINTED, config(max_new_tokens=40, marker_before_stop=True))
    assert [r.token_ids for r in unmarked] == [r.token_ids for r in free]


def test_repetition_loop_stops_hinted_rows():
    model = varied_model(seed=0, hidden=64)  # loops quickly
    cfg = config(beta=0.0, max_new_tokens=60, repetition_window=4, repetition_count=3)
    got = hinted_decode(model, TOKENIZER, PLAIN, HINTED, cfg)
    free = hinted_decode(model, TOKENIZER, PLAIN, HINTED, config(beta=0.0, max_new_tokens=60))
    assert any(r.finish_reason == "repetition" for r in got)
    for stopped, full in zip(got, free):
        if stopped.finish_reason == "repetition":
            first = next(i for i in range(full.n_tokens) if has_repeated_window(full.token_ids[: i + 1], 4, 3))
            assert stopped.token_ids == full.token_ids[: first + 1]
        else:
            assert stopped.token_ids == full.token_ids


def test_config_errors_are_user_errors():
    model = varied_model()
    with pytest.raises(UserError, match="mode"):
        hinted_decode(model, TOKENIZER, PLAIN, HINTED, config(mode="cubic"))
    with pytest.raises(UserError, match="beta"):
        hinted_decode(model, TOKENIZER, PLAIN, HINTED, config(beta=-1.0))
    with pytest.raises(UserError, match="hinted prompts"):
        hinted_decode(model, TOKENIZER, PLAIN, HINTED[:2], config())
