"""Batched KV-cache generation pinned against `model.generate`, one-at-a-time and uncached decoding."""

import math
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from onsft.engine.decoding import SamplingConfig, generate
from onsft.engine.kv_cache import SPAN_ATTENTION, GrowingCache, row_spans, span_attention
from onsft.engine.row_batch import RowBatch, _chunks
from onsft.errors import UserError
from onsft.formulas.sampling import (
    RepetitionDetector,
    example_generator,
    filter_logprobs,
    has_repeated_window,
    sample_tokens,
)
from tiny import tiny_tokenizer

TOKENIZER = tiny_tokenizer()


def varied_model(seed: int = 0, hidden: int = 32, head_scale: float = 20.0, dtype=torch.float64):
    """A tiny Llama whose greedy outputs vary with the prompt. tests/tiny.py ties the head to the
    embeddings, which makes a random model repeat its last input token forever; an untied, scaled head
    gives peaked but varied distributions. float64 so near-ties cannot flip an argmax between the
    batched, padded and uncached paths."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(TOKENIZER),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(dtype).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    return model


def encode(text: str) -> list[int]:
    return TOKENIZER.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
    )["input_ids"]


PROMPTS = [encode(t) for t in ("hello there", "x", "what is 2+2? tell me", "abc def ghi jkl mno pqr", "q?")]


def hf_greedy(model, prompt, max_new_tokens):
    ids = torch.tensor([prompt])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0
    )
    return out[0, len(prompt) :].tolist()


# --- pure functions --------------------------------------------------------------------------


def naive_filter(logits, temperature, top_k, top_p):
    """float64, one row at a time, by the textbook definition."""
    logp = torch.log_softmax(logits.double() / temperature, -1)
    keep = torch.ones_like(logp, dtype=torch.bool)
    order = sorted(range(len(logp)), key=lambda v: -float(logp[v]))
    if top_k:
        keep[:] = False
        keep[[v for v in order if logp[v] >= logp[order[top_k - 1]]]] = True
    if top_p < 1:
        probs = torch.where(keep, logp.exp(), torch.zeros_like(logp))
        probs = probs / probs.sum()
        mass, chosen = 0.0, set()
        for v in order:
            if not keep[v]:
                continue
            chosen.add(v)
            mass += float(probs[v])
            if mass >= top_p:
                break
        keep = torch.tensor([v in chosen for v in range(len(logp))])
    out = torch.where(keep, logp, torch.full_like(logp, -math.inf))
    return torch.log_softmax(out, -1)


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(1.0, 0, 1.0), (0.3, 0, 0.95), (0.7, 5, 1.0), (1.5, 7, 0.6), (1.0, 0, 0.01)]
)
def test_filter_logprobs_matches_naive_float64(temperature, top_k, top_p):
    torch.manual_seed(1)
    logits = torch.randn(6, 40) * 3
    got = filter_logprobs(logits, temperature, top_k, top_p)
    for row in range(6):
        want = naive_filter(logits[row], temperature, top_k, top_p)
        assert torch.equal(torch.isinf(got[row]), torch.isinf(want))
        finite = ~torch.isinf(want)
        assert torch.allclose(got[row][finite].double(), want[finite], atol=1e-5)
    assert torch.allclose(got.exp().sum(-1), torch.ones(6), atol=1e-5)
    if top_p == 0.01 and not top_k:
        assert ((~torch.isinf(got)).sum(-1) == 1).all()  # only the argmax survives a tiny nucleus


@pytest.mark.parametrize("flat_rows", [0, 2])
def test_nucleus_search_among_candidates_equals_full_sort(flat_rows):
    """Peaked rows find their nucleus among the top candidates; a flat row (nucleus wider than the
    candidates) makes the whole batch sort the full vocabulary. Both paths match the naive rule."""
    torch.manual_seed(3)
    logits = torch.randn(5, 2000) * 6
    logits[:flat_rows] *= 0.01
    got = filter_logprobs(logits, 1.0, 0, 0.9)
    if flat_rows:
        assert ((~torch.isinf(got[:flat_rows])).sum(-1) > 256).all()
    for row in range(5):
        want = naive_filter(logits[row], 1.0, 0, 0.9)
        assert torch.equal(torch.isinf(got[row]), torch.isinf(want))
        finite = ~torch.isinf(want)
        assert torch.allclose(got[row][finite].double(), want[finite], atol=1e-5)


def test_sample_tokens_greedy_is_argmax_and_seeded_draws_repeat():
    torch.manual_seed(2)
    scores = torch.randn(4, 30)
    assert torch.equal(sample_tokens(scores, SamplingConfig(temperature=0), []), scores.argmax(-1))
    config = SamplingConfig(temperature=1.0)
    draws = [sample_tokens(scores, config, [example_generator(7, i) for i in range(4)]) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    # Empirical frequencies of one row follow its distribution (30k draws, 4 sigma).
    gen = example_generator(0, 0)
    counts = (
        torch.bincount(sample_tokens(scores[:1].expand(10000, -1), config, [gen] * 10000), minlength=30).double()
        / 10000
    )
    probs = torch.softmax(scores[0].double(), -1)
    assert (counts - probs).abs().max() < 4 * math.sqrt(0.25 / 10000)


def test_repetition_detector_matches_naive_rule_at_every_prefix():
    rng = random.Random(0)
    for _trial in range(40):
        window, count = rng.randint(1, 4), rng.randint(2, 4)
        tokens = [rng.randint(0, 2) for _ in range(60)]
        detector = RepetitionDetector(window, count)
        for i, token in enumerate(tokens):
            fired = detector.push(token)
            assert fired == has_repeated_window(tokens[: i + 1], window, count)
            if fired:
                break
    # The reference setting: one 30-token window 5 times; a period-1 loop qualifies at 34 tokens.
    detector = RepetitionDetector(30, 5)
    assert [detector.push(9) for _ in range(34)].index(True) == 33
    assert not RepetitionDetector(3, 0).push(1)


def test_prefill_chunks_respect_token_budget():
    lengths = [50, 40, 40, 10, 10, 10, 10]
    chunks = _chunks(range(100, 107), lengths, token_budget=100)
    assert [list(c) for c in chunks] == [[100, 101], [102, 103], [104, 105, 106]]
    assert [list(c) for c in _chunks(range(3), [500, 1, 1], token_budget=10)] == [[0], [1, 2]]


# --- rows and caches -------------------------------------------------------------------------


def test_row_spans_minimise_columns_read():
    rng = random.Random(0)
    for _ in range(200):
        width = rng.randint(1, 50)
        first = [rng.randrange(width) for _ in range(rng.randint(1, 12))]
        spans = row_spans(first, width, min_saving=0.0)
        assert spans[0][0] == 0 and spans[-1][1] == len(first)
        assert all(column == min(first[a:b]) for a, b, column in spans)
        cost = sum((b - a) * (width - column) for a, b, column in spans)
        brute = min(
            [len(first) * (width - min(first))]
            + [s * (width - min(first[:s])) + (len(first) - s) * (width - min(first[s:])) for s in range(1, len(first))]
        )
        assert cost == brute
    # Hinted rows from column 0, plain rows from column 700 of 800: two spans.
    assert row_spans([0] * 4 + [700] * 4, 800) == [(0, 4, 0), (4, 8, 700)]
    assert row_spans([0, 1, 0, 2], 800) == [(0, 4, 0)]  # a split would save < 10%


@pytest.mark.parametrize("spans", [False, True])
def test_row_batch_cache_layouts_match_uncached_recompute(spans):
    """Shared-prefix prefill, chunked prefill, in-place cache growth, row dropping, trimming of
    all-padding columns and attention per row span all give the log-probs of recomputing every row
    from scratch."""
    model = varied_model(seed=5)
    if spans:
        with span_attention(model) as switched:
            assert switched and model.config._attn_implementation == SPAN_ATTENTION
            check_row_batch_layouts(model)
        assert model.config._attn_implementation == "sdpa"
    else:
        check_row_batch_layouts(model)


def check_row_batch_layouts(model):
    gen = torch.Generator().manual_seed(0)
    shared = torch.randint(5, 100, (20,), generator=gen).tolist()
    group_a = [shared + torch.randint(5, 100, (n,), generator=gen).tolist() for n in (1, 9, 30, 4)]
    group_b = [torch.randint(5, 100, (n,), generator=gen).tolist() for n in (3, 12, 7)]
    prompts = group_a + group_b
    groups = [range(0, 4), range(4, 7)]
    for budget in (4096, 40):
        cached = RowBatch(model, prompts, prefill_groups=groups, prefill_token_budget=budget, cache_reserve=2)
        assert isinstance(cached.cache, GrowingCache)
        plain = RowBatch(model, prompts, use_cache=False)
        assert torch.allclose(cached.logprobs, plain.logprobs, atol=1e-10)
        first = (cached.mask != 0).int().argmax(1).tolist()
        assert len(row_spans(first, cached.mask.shape[1])) == 2  # the short group attends on its own
        # Drop rows (the long group first, so leading padding columns get trimmed), keep appending.
        for keep in (None, [0, 1, 2, 3, 4, 5], None, [1, 3, 4, 5], [2, 3], None, [1]):
            keep = None if keep is None else torch.tensor(keep)
            tokens = torch.randint(5, 100, (cached.rows if keep is None else len(keep),), generator=gen)
            assert torch.allclose(cached.advance(keep, tokens), plain.advance(keep, tokens), atol=1e-10)
        assert cached.mask.shape[1] == plain.mask.shape[1] < 30  # the 50-token row's columns are gone


# --- the decoding loop -----------------------------------------------------------------------


def test_greedy_reproduces_hf_generate_token_for_token():
    model = varied_model()
    gens = generate(model, TOKENIZER, PROMPTS, SamplingConfig(max_new_tokens=40, repetition_count=0))
    reasons = set()
    for prompt, gen in zip(PROMPTS, gens):
        want = hf_greedy(model, prompt, 40)
        assert gen.token_ids == want
        assert gen.n_tokens == len(want)
        assert gen.finish_reason == ("eos" if want[-1] == 1 else "length")
        assert gen.text == TOKENIZER.decode(want, skip_special_tokens=True)
        reasons.add(gen.finish_reason)
    assert reasons == {"eos", "length"}  # both stop rules are exercised by these prompts
    assert len({tuple(g.token_ids) for g in gens}) == len(gens)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_batched_equals_one_at_a_time_and_uncached(temperature):
    model = varied_model(seed=3)
    base = SamplingConfig(max_new_tokens=20, temperature=temperature, top_p=0.9, seed=11, repetition_count=0)
    whole = generate(model, TOKENIZER, PROMPTS, base)
    for variant in (dict(batch_size=1), dict(use_cache=False)):
        other = generate(model, TOKENIZER, PROMPTS, SamplingConfig(**{**base.__dict__, **variant}))
        assert [g.token_ids for g in other] == [g.token_ids for g in whole], variant
    if temperature == 0:
        # Greedy tokens do not depend on the order of the inputs either (samples do: the seed of an
        # example's random stream is its position in the list).
        shuffled = generate(model, TOKENIZER, PROMPTS[::-1], base)
        assert [g.token_ids for g in shuffled[::-1]] == [g.token_ids for g in whole]


def test_seeded_sampling_is_reproducible_and_seed_matters():
    model = varied_model(seed=4, head_scale=5.0)
    config = SamplingConfig(max_new_tokens=25, temperature=1.0, seed=5, repetition_count=0)
    first = [g.token_ids for g in generate(model, TOKENIZER, PROMPTS, config)]
    assert first == [g.token_ids for g in generate(model, TOKENIZER, PROMPTS, config)]
    other = [g.token_ids for g in generate(model, TOKENIZER, PROMPTS, SamplingConfig(**{**config.__dict__, "seed": 6}))]
    assert other != first
    greedy = [g.token_ids for g in generate(model, TOKENIZER, PROMPTS, SamplingConfig(max_new_tokens=25))]
    assert greedy != first


def test_repetition_loop_stops_at_first_qualifying_token():
    model = varied_model(seed=0, hidden=64)  # this seed loops ("WWWW...", "s*s*s*")
    config = SamplingConfig(max_new_tokens=60, repetition_window=4, repetition_count=3)
    gens = generate(model, TOKENIZER, PROMPTS[:3], config)
    assert {g.finish_reason for g in gens} == {"repetition"}
    for prompt, gen in zip(PROMPTS, gens):
        free = hf_greedy(model, prompt, 60)
        first = next(i for i in range(len(free)) if has_repeated_window(free[: i + 1], 4, 3))
        assert gen.token_ids == free[: first + 1]


def test_stop_strings_end_rows_where_the_text_first_contains_them():
    model = varied_model()
    config = SamplingConfig(max_new_tokens=40, repetition_count=0)
    free = generate(model, TOKENIZER, PROMPTS, config)
    stop = free[0].text[5:7]  # two characters of the first continuation, wherever they first occur
    got = generate(model, TOKENIZER, PROMPTS, SamplingConfig(**{**config.__dict__, "stop_strings": ["@@@", stop]}))
    for full, cut in zip(free, got):
        ends = [i + 1 for i in range(full.n_tokens) if stop in TOKENIZER.decode(full.token_ids[: i + 1])]
        if ends and (full.finish_reason != "eos" or ends[0] < full.n_tokens):
            assert cut.finish_reason == "stop" and cut.token_ids == full.token_ids[: ends[0]]
        else:
            assert cut.token_ids == full.token_ids and cut.finish_reason == full.finish_reason
    assert got[0].finish_reason == "stop" and got[0].n_tokens <= 7
    with pytest.raises(UserError, match="stop_strings"):
        generate(model, TOKENIZER, PROMPTS, SamplingConfig(stop_strings=[""]))


def test_min_new_tokens_suppresses_eos():
    model = varied_model()
    plain = generate(model, TOKENIZER, PROMPTS, SamplingConfig(max_new_tokens=40, repetition_count=0))
    stopped = [i for i, g in enumerate(plain) if g.finish_reason == "eos"]
    assert stopped
    floor = generate(
        model, TOKENIZER, PROMPTS, SamplingConfig(max_new_tokens=40, min_new_tokens=40, repetition_count=0)
    )
    for i in stopped:
        assert floor[i].n_tokens == 40 and floor[i].finish_reason == "length"
        assert 1 not in floor[i].token_ids
        # Up to the suppressed EOS the two runs agree.
        assert floor[i].token_ids[: plain[i].n_tokens - 1] == plain[i].token_ids[:-1]


def test_context_limit_and_bad_prompts():
    model = varied_model()
    gens = generate(
        model, TOKENIZER, [[5] * 250], SamplingConfig(max_new_tokens=40, min_new_tokens=40, repetition_count=0)
    )
    assert gens[0].n_tokens == 6 and gens[0].finish_reason == "length"  # 250 + 6 = the 256-token context
    with pytest.raises(UserError, match="prompt 1 is empty"):
        generate(model, TOKENIZER, [[5], []])
    with pytest.raises(UserError, match="context is 256"):
        generate(model, TOKENIZER, [[5] * 256])
    with pytest.raises(UserError, match="top_p"):
        generate(model, TOKENIZER, [[5]], SamplingConfig(top_p=0.0))


def test_model_mode_is_restored():
    model = varied_model().train()
    generate(model, TOKENIZER, PROMPTS[:1], SamplingConfig(max_new_tokens=2))
    assert model.training
