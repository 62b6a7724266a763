"""Batched decoding with a KV cache: sampling rules, stop rules, and the loop hinted decoding shares.

One loop (`onsft.engine.decode_loop`) serves plain generation and hinted decoding. Every example owns
one or two *contexts* (token rows): a plain prompt, and optionally a hinted prompt. The rows of the
examples being decoded run through the model together, left-padded, with one KV cache. At each step
the loop turns the rows' next-token log-probs into one distribution per example (plain generation:
the plain row's; hinted decoding: a mixture, see `onsft.engine.hinted`), samples one token per
example, appends it to every row of that example, and retires rows that are no longer needed
(finished examples; hinted rows after the hand-over), so they stop costing compute; with the default
continuous schedule the freed slots take the next pending examples at once. Plain `generate` is this
loop with no hinted rows.

Sampling is deterministic for a seed and independent of batching and scheduling: each example draws
from its own `torch.Generator`, seeded from (seed, the example's index in the input list, or its
given id).

What keeps a step cheap (a decoding step mostly reads weights and the KV cache): a prefix shared by
all prompts of a context is prefilled once per call; the cache grows in place instead of being
concatenated every step; a row leaves by having one other row moved into its slot, not by copying
the cache; columns that are padding for every row are cut; with `sdpa` models, attention runs per
span of rows (hinted, plain) from the span's first used column, so short plain rows do not read the
hinted rows' long padding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from onsft.engine.decode_loop import SCHEDULES, DecodeStats, Mixer, Trace, run_examples, stop_token_ids
from onsft.engine.kv_cache import span_attention
from onsft.engine.row_batch import group_prefix
from onsft.errors import UserError

FINISH_REASONS = ("eos", "stop", "length", "repetition")
# The loop's pieces that callers of this module use (Trace, Mixer, stop_token_ids) live in decode_loop.
__all__ = [
    "FINISH_REASONS",
    "SCHEDULES",
    "DecodeStats",
    "Generation",
    "Mixer",
    "OwnSamplingConfig",
    "SamplingConfig",
    "Trace",
    "decode_examples",
    "generate",
    "sample_own",
    "stop_token_ids",
]


@dataclass
class SamplingConfig:
    """How to sample continuations. Field names follow `transformers.GenerationConfig` where they overlap."""

    max_new_tokens: int = field(default=1024, metadata={"help": "Most tokens generated per example."})
    min_new_tokens: int = field(
        default=0, metadata={"help": "EOS is suppressed until this many tokens exist (benchmarks, length floors)."}
    )
    temperature: float = field(default=0.0, metadata={"help": "Softmax temperature; 0 means greedy (argmax)."})
    top_p: float = field(
        default=1.0,
        metadata={"help": "Nucleus sampling: keep the smallest set of tokens holding this much probability (1 = off)."},
    )
    top_k: int = field(default=0, metadata={"help": "Keep only the k most likely tokens (0 = off)."})
    seed: int = field(
        default=0,
        metadata={
            "help": "Sampling seed; example i draws from its own generator "
            "seeded by (seed, i), so batching does not change samples."
        },
    )
    repetition_window: int = field(
        default=30,
        metadata={
            "help": "Stop a row when one window of this many tokens has occurred "
            "`repetition_count` times (a degenerate loop)."
        },
    )
    repetition_count: int = field(
        default=5, metadata={"help": "Occurrences of one window that stop a row (0 = never stop for repetition)."}
    )
    stop_strings: list[str] = field(
        default_factory=list,
        metadata={
            "help": "A row stops (finish_reason 'stop') once its text contains one of "
            "these; the tokens that complete it are kept."
        },
    )
    batch_size: int = field(default=16, metadata={"help": "Examples decoded together."})
    use_cache: bool = field(
        default=True,
        metadata={
            "help": "Decode with a KV cache. False recomputes the whole sequence every step "
            "(quadratic; only for tests and as a benchmark baseline)."
        },
    )

    def validate(self) -> None:
        problems = []
        if self.max_new_tokens < 1:
            problems.append(("max_new_tokens", "must be at least 1"))
        if self.min_new_tokens < 0:
            problems.append(("min_new_tokens", "must be >= 0"))
        if self.temperature < 0:
            problems.append(("temperature", "must be >= 0 (0 = greedy)"))
        if not 0 < self.top_p <= 1:
            problems.append(("top_p", "must be in (0, 1]"))
        if self.top_k < 0:
            problems.append(("top_k", "must be >= 0 (0 = off)"))
        if self.repetition_count < 0 or self.repetition_window < 1:
            problems.append(("repetition_window/count", "window must be >= 1 and count >= 0"))
        if self.batch_size < 1:
            problems.append(("batch_size", "must be at least 1"))
        if any(not stop for stop in self.stop_strings):
            problems.append(("stop_strings", "must not contain an empty string"))
        if problems:
            name, why = problems[0]
            raise UserError(f"`{name}` {why}", where="config", fix=f"set a valid `{name}`.")


@dataclass
class OwnSamplingConfig(SamplingConfig):
    """The model's own samples (pass@k in `onsft eval`, preference pairs in `onsft pairs`): the same settings
    with the defaults of sampling from the model's distribution itself, temperature 1 over the full
    vocabulary."""

    max_new_tokens: int = field(default=512, metadata={"help": "Most tokens generated per response."})
    temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature (1 = the model's own distribution; 0 = greedy)."}
    )


@dataclass
class Generation:
    """One decoded continuation. `finish_reason` is one of FINISH_REASONS. `token_ids` include the
    final EOS when it is 'eos' (as `model.generate` returns it) and the tokens completing the stop
    string when it is 'stop'; `text` is decoded without special tokens."""

    token_ids: list[int]
    text: str
    finish_reason: str
    n_tokens: int


def decode_examples(
    model,
    tokenizer,
    plain_ids: list[list[int]],
    hinted_ids: list[list[int]] | None,
    config: SamplingConfig,
    mixer: Mixer | None = None,
    answer_marker: str | Sequence[str] = "",
    hinted_first: bool = True,
    progress: Callable[[int], None] | None = None,
    *,
    marker_before_stop: bool = False,
    schedule: str = "continuous",
    shared_prefix: str | list[int] = "auto",
    example_ids: list[int] | None = None,
    token_limits: list[int] | None = None,
    stats: DecodeStats | None = None,
) -> list[Trace]:
    """Decode every example; returns traces in input order.

    With `hinted_ids`, example i has a hinted row and a plain row; each step's distribution is
    `mixer(hinted, plain)`, except the first step (hinted alone, when `hinted_first`) and every step
    after `answer_marker` (or any of several, a sequence) appeared in the generated text (plain alone; the
    hinted row is dropped). With `marker_before_stop`, a hinted example cannot stop (EOS) before a marker:
    the plain context always writes what follows it, and an example that never reaches one ends at its limit.
    Without `hinted_ids` each example has its plain row only: ordinary decoding.

    Keyword options, none of which changes a token in exact arithmetic (other batch shapes round floats
    differently, so a near-tie of float32 logits can flip; the tests pin identity in float64): `schedule`
    "continuous" refills freed row slots with pending examples, "static" waits for the whole batch (see
    `decode_loop`); `shared_prefix`
    "auto" prefills the longest token prefix shared by all hinted (and, apart, all plain) prompts once
    per call, "off" never, or a given token list when every prompt of a context extends it;
    `example_ids[i]` seeds example i's random stream with (seed, example_ids[i]) instead of (seed, i),
    so the same ids give the same samples in any input order; `token_limits[i]` caps example i below
    `config.max_new_tokens`; `stats` collects counts (`DecodeStats`).
    """
    config.validate()
    if hinted_ids is not None and mixer is None:
        raise ValueError("decoding with hinted contexts needs a mixer (see onsft.engine.hinted.make_mixer)")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, not {schedule!r}")
    if hinted_ids is not None and len(hinted_ids) != len(plain_ids):
        raise UserError(
            f"{len(hinted_ids)} hinted prompts for {len(plain_ids)} plain prompts",
            where="hinted decoding",
            fix="pass one hinted prompt per plain prompt.",
        )
    for name, values in (("example_ids", example_ids), ("token_limits", token_limits)):
        if values is not None and len(values) != len(plain_ids):
            raise ValueError(f"{len(values)} {name} for {len(plain_ids)} examples")
    if token_limits is not None and min(token_limits, default=1) < 1:
        raise ValueError("every token limit must be at least 1")
    if example_ids is not None and len(set(example_ids)) != len(example_ids):
        raise ValueError("example_ids must be distinct: equal ids would sample from the same random stream")
    limit = getattr(model.config, "max_position_embeddings", None)
    for name, prompts in (("plain", plain_ids), ("hinted", hinted_ids or [])):
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise UserError(f"{name} prompt {i} is empty", where="generation", fix="drop the example.")
            if limit and len(prompt) >= limit:
                raise UserError(
                    f"{name} prompt {i} has {len(prompt)} tokens, the model's context is {limit}",
                    where="generation",
                    fix="shorten the prompt or drop the example.",
                )
    if not plain_ids:
        return []
    # Similar lengths together waste less padding, and the longest first make room for the rest;
    # results do not depend on the order.
    lead = hinted_ids if hinted_ids is not None else plain_ids
    order = sorted(range(len(plain_ids)), key=lambda i: (-len(lead[i]), -len(plain_ids[i]), i))
    groups = [hinted_ids, plain_ids] if hinted_ids is not None else [plain_ids]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), span_attention(model):
            traces = run_examples(
                model,
                tokenizer,
                order,
                plain_ids,
                hinted_ids,
                config,
                mixer=mixer,
                answer_markers=tuple(
                    m for m in ([answer_marker] if isinstance(answer_marker, str) else answer_marker) if m
                ),
                hinted_first=hinted_first,
                marker_before_stop=marker_before_stop,
                context=limit,
                schedule=schedule,
                prefixes=[group_prefix(prompts, shared_prefix) for prompts in groups],
                seeds=list(example_ids) if example_ids is not None else list(range(len(plain_ids))),
                limits=[
                    min(config.max_new_tokens, n) for n in token_limits or [config.max_new_tokens] * len(plain_ids)
                ],
                progress=progress,
                stats=stats if stats is not None else DecodeStats(),
            )
    finally:
        model.train(was_training)
    return [traces[i] for i in range(len(plain_ids))]


def generate(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    config: SamplingConfig | None = None,
    progress: Callable[[int], None] | None = None,
    **options,
) -> list[Generation]:
    """Sample one continuation per prompt (token ids), batched, stopping per row at EOS, a stop string,
    `max_new_tokens` or a repetition loop. Results do not depend on `batch_size` or the schedule (nor,
    for greedy decoding or with `example_ids`, on the order of the prompts). `options`: the keyword
    options of `decode_examples`."""
    config = config or SamplingConfig()
    traces = decode_examples(model, tokenizer, prompt_ids, None, config, progress=progress, **options)
    return [
        Generation(
            token_ids=t.token_ids,
            text=tokenizer.decode(t.token_ids, skip_special_tokens=True),
            finish_reason=t.finish_reason,
            n_tokens=len(t.token_ids),
        )
        for t in traces
    ]


def sample_own(
    model, tokenizer, prompts: list[list[int]], max_new_tokens: int, seed: int, **options
) -> list[Generation]:
    """The model's own samples at temperature 1 over the full vocabulary, with no stop rule but EOS and the
    limit (the on-policy baseline of DDT). Sample i depends only on (seed, i). `options`: the keyword
    options of `decode_examples`."""
    config = SamplingConfig(
        max_new_tokens=max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        seed=seed,
        repetition_count=0,
        batch_size=max(1, len(prompts)),
    )
    return generate(model, tokenizer, prompts, config, **options)
