"""Continuous batching, row retirement by moves and per-run prefix reuse change no token.

Every decoding variant (batch size, schedule, arrival order, prefix reuse, greedy or seeded sampling,
plain or hinted) is pinned token for token against decoding each example alone. The model is the
tiny float64 Llama of test_generation (float64 so that a different batch composition, which changes
the order of float sums, cannot flip an argmax or a sampled token).
"""

import random

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from onsft.engine.decoding import DecodeStats, SamplingConfig, generate
from onsft.engine.hinted import HintedConfig, hinted_decode
from onsft.engine.row_batch import RowBatch, group_prefix
from test_generation import TOKENIZER, varied_model
from tiny import tiny_tokenizer

SYSTEM = "You are a careful assistant. Answer briefly."  # a shared prefix of > 16 tokens (characters)
QUESTIONS = ["hello there", "x", "what is 2+2? tell me", "abc def ghi", "q?", "zz top", "7*6", "why?", "ok", "no."]


def chat(system: str, user: str) -> list[int]:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    return TOKENIZER.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]


PLAIN = [chat(SYSTEM, q) for q in QUESTIONS]
HINTED = [
    chat("Rewrite the reference in your own words, then answer.", f"{q}\nReference: {q[::-1]}") for q in QUESTIONS
]


def one_at_a_time(decode, prompts, config, **options):
    """Each example decoded alone (batch of one), keeping its own random stream (its example id)."""
    return [decode([[p[i]] for p in prompts], config, example_ids=[i], **options)[0] for i in range(len(prompts[0]))]


def outcome(result) -> tuple:
    fields = ("token_ids", "finish_reason", "handover_step", "mean_lambda")
    return tuple(getattr(result, f, None) for f in fields)


@pytest.fixture(scope="module")
def model():
    model = varied_model(seed=2, head_scale=8.0)
    with torch.no_grad():
        model.lm_head.weight[1] *= 2.0  # EOS (id 1) likelier: about half the examples stop early
    return model


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_plain_generation_is_the_same_in_any_batch_schedule_order_and_prefix(model, temperature):
    config = SamplingConfig(max_new_tokens=24, temperature=temperature, top_p=0.95, seed=7, repetition_count=0)

    def decode(prompts, cfg, **options):
        return generate(model, TOKENIZER, prompts[0], cfg, **options)

    want = [outcome(g) for g in one_at_a_time(decode, [PLAIN], config, shared_prefix="off")]
    # Skewed lengths: some examples stop early at EOS, the others run to the limit.
    assert {w[1] for w in want} == {"eos", "length"} and len({len(w[0]) for w in want}) >= 3
    assert len(group_prefix(PLAIN)) > 16  # the system prompt is prefilled once per call
    order = list(range(len(PLAIN)))
    random.Random(0).shuffle(order)
    for batch in (1, 3, 8):
        cfg = SamplingConfig(**{**config.__dict__, "batch_size": batch})
        for schedule in ("continuous", "static"):
            for prefix in ("auto", "off"):
                got = generate(model, TOKENIZER, PLAIN, cfg, schedule=schedule, shared_prefix=prefix)
                assert [outcome(g) for g in got] == want, (batch, schedule, prefix)
        # Another arrival order: the same ids give every example the same stream, so the same tokens.
        shuffled = generate(model, TOKENIZER, [PLAIN[i] for i in order], cfg, example_ids=order)
        assert [outcome(g) for g in shuffled] == [want[i] for i in order], batch


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_hinted_decoding_is_the_same_in_any_batch_schedule_order_and_prefix(model, temperature):
    base = dict(max_new_tokens=24, temperature=temperature, beta=1.5, repetition_count=0, seed=3)
    free = hinted_decode(model, TOKENIZER, PLAIN, HINTED, HintedConfig(**base, answer_marker=""))
    # A marker some outputs write early: their hinted rows retire at the hand-over, mid-run.
    marker = free[0].text[2:4]
    config = HintedConfig(**base, answer_marker=marker)

    def decode(prompts, cfg, **options):
        return hinted_decode(model, TOKENIZER, prompts[0], prompts[1], cfg, **options)

    want = [outcome(g) for g in one_at_a_time(decode, [PLAIN, HINTED], config, shared_prefix="off")]
    assert any(w[2] is not None for w in want) and any(w[2] is None for w in want)
    assert len({len(w[0]) for w in want}) > 2
    assert len(group_prefix(HINTED)) > 16 and len(group_prefix(PLAIN)) > 16
    order = list(range(len(PLAIN)))
    random.Random(1).shuffle(order)
    for batch in (1, 3, 8):
        cfg = HintedConfig(**{**config.__dict__, "batch_size": batch})
        for schedule in ("continuous", "static"):
            for prefix in ("auto", "off"):
                got = hinted_decode(model, TOKENIZER, PLAIN, HINTED, cfg, schedule=schedule, shared_prefix=prefix)
                assert [outcome(g) for g in got] == want, (batch, schedule, prefix)
        shuffled = hinted_decode(
            model, TOKENIZER, [PLAIN[i] for i in order], [HINTED[i] for i in order], cfg, example_ids=order
        )
        assert [outcome(g) for g in shuffled] == [want[i] for i in order], batch


def test_continuous_schedule_refills_slots_and_takes_fewer_steps(model):
    # Per-example limits make the lengths skewed on purpose: 2 long examples among 8 short ones.
    limits = [20 if i % 5 == 0 else 3 for i in range(len(PLAIN))]
    config = SamplingConfig(max_new_tokens=20, min_new_tokens=20, batch_size=4, repetition_count=0)
    runs = {}
    for schedule in ("continuous", "static"):
        stats = DecodeStats()
        runs[schedule] = generate(model, TOKENIZER, PLAIN, config, schedule=schedule, token_limits=limits, stats=stats)
        runs[schedule + " stats"] = stats
    assert [g.n_tokens for g in runs["continuous"]] == limits
    assert [g.token_ids for g in runs["continuous"]] == [g.token_ids for g in runs["static"]]
    alone = generate(model, TOKENIZER, PLAIN, config)  # without limits: the limited outputs are its prefixes
    assert all(g.token_ids == a.token_ids[: g.n_tokens] for g, a in zip(runs["continuous"], alone))
    continuous, static = runs["continuous stats"], runs["static stats"]
    assert continuous.row_steps == static.row_steps == sum(limits) - len(limits)  # the same tokens decoded
    assert continuous.admissions > static.admissions == 3  # static: one admission per batch of 4
    assert continuous.decode_steps < static.decode_steps
    assert continuous.idle_share < static.idle_share


def check_same_logprobs(cached: RowBatch, uncached: RowBatch):
    assert cached.row_of.keys() == uncached.row_of.keys()
    for key, row in cached.row_of.items():
        assert torch.allclose(cached.logprobs[row], uncached.logprobs[uncached.row_of[key]], atol=1e-10), key


def test_rows_admitted_retired_and_moved_match_recomputing_from_scratch():
    """Random admissions (into both groups of a running batch, longer prompts than the cache is wide
    included), retirements and steps: every row's log-probs equal the uncached recompute, groups stay
    contiguous, and the per-run shared prefix is used."""
    model = varied_model(seed=5)
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    prefixes = [torch.randint(5, 100, (18,), generator=gen).tolist(), []]

    def prompt(group):
        return prefixes[group] + torch.randint(5, 100, (rng.randint(1, 30),), generator=gen).tolist()

    options = dict(capacity=12, groups=2, cache_reserve=3)
    cached = RowBatch(model, shared_prefixes=prefixes, **options)
    uncached = RowBatch(model, use_cache=False, shared_prefixes=prefixes, **options)
    assert cached.prefixes[0] == prefixes[0] and uncached.prefixes == [[], []]
    next_key = 0
    for _round in range(25):
        free = cached.capacity - cached.rows
        if free and rng.random() < 0.5:
            entries = []
            for _ in range(rng.randint(1, free)):
                group = rng.randint(0, 1)
                entries.append((next_key, group, prompt(group)))
                next_key += 1
            cached.admit(entries)
            uncached.admit(entries)
        elif cached.rows and rng.random() < 0.5:
            leaving = rng.sample(list(cached.row_of), rng.randint(1, min(3, cached.rows)))
            cached.retire(leaving)
            uncached.retire(leaving)
        if cached.rows:
            check_same_logprobs(cached, uncached)
            tokens = {key: rng.randint(5, 99) for key in cached.row_of}
            cached.step(torch.tensor([tokens[key] for key in cached.keys]))
            uncached.step(torch.tensor([tokens[key] for key in uncached.keys]))
            check_same_logprobs(cached, uncached)
        groups = [next(g for g, end in enumerate(cached.block_end) if r < end) for r in range(cached.rows)]
        assert groups == sorted(groups)
    assert next_key > 15


def test_retiring_a_row_copies_one_row_per_group_not_the_whole_cache():
    model = varied_model(seed=5)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, 100, (n,), generator=gen).tolist() for n in (40, 35, 30, 8, 9, 10)]
    rows = RowBatch(model, prompts, prefill_groups=[range(0, 3), range(3, 6)])
    for _ in range(3):
        rows.step(torch.randint(5, 100, (rows.rows,), generator=gen))
    copies = rows.cache.copies
    whole_before, moved_before = copies.whole_copies, copies.moved_bytes
    layers = len(rows.cache.layers)
    row_bytes = rows.cache.layers[0].row_bytes() * layers
    live = rows.cache.live_bytes()
    rows.retire([0])  # a hinted row: the last hinted row fills it, the last plain row fills the hole
    assert copies.whole_copies == whole_before
    assert copies.moved_bytes - moved_before == 2 * row_bytes < live / 2
    assert rows.keys == [2, 1, 5, 3, 4] and rows.block_end == [2, 5]
    rows.retire([4])  # the last row: nothing moves
    assert copies.moved_bytes - moved_before == 2 * row_bytes and copies.whole_copies == whole_before
    # The legacy whole-batch select copies every kept row of every layer, and is counted as such.
    rows.advance(torch.tensor([0, 1, 2]), torch.tensor([7, 8, 9]))
    assert copies.whole_copies == whole_before + layers


def test_a_model_whose_cache_the_loop_cannot_manage_decodes_to_the_end():
    """A sliding-window model takes the library's own cache (rows dropped by selection): every row leaving
    on the last step used to build an empty float index and crash."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=64,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = MistralForCausalLM(config).eval()
    prompts = [tokenizer("Copy ab.").input_ids, tokenizer("Copy cdef.").input_ids]
    sampling = SamplingConfig(max_new_tokens=6, temperature=0.0, batch_size=2)
    together = generate(model, tokenizer, prompts, sampling)
    alone = [generate(model, tokenizer, [p], sampling)[0] for p in prompts]
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]
    assert all(g.n_tokens == len(g.token_ids) > 0 for g in together)
