"""Batched decoding with a KV cache: sampling rules, stop rules, and the loop hinted decoding shares.

One loop serves plain generation and hinted decoding. Every example owns one or two *contexts*
(token rows): a plain prompt, and optionally a hinted prompt. All rows of a batch run through the
model together, left-padded, with one KV cache. At each step the loop turns the rows' next-token
log-probs into one distribution per example (plain generation: the plain row's; hinted decoding: a
mixture, see `onsft.engine.hinted`), samples one token per example, appends it to every row of that example,
and drops rows that are no longer needed (finished examples; hinted rows after the hand-over), so
they stop costing compute. Plain `generate` is this loop with no hinted rows.

Sampling is deterministic for a seed and independent of batching: each example draws from its own
`torch.Generator`, seeded from (seed, the example's index in the input list).

What keeps a step cheap (a decoding step mostly reads weights and the KV cache): a prefix shared by
a group's prompts is prefilled once; the cache grows in place instead of being concatenated every
step; rows that finish or hand over leave the batch, and columns that are padding for every row are
cut; with `sdpa` models, attention runs per span of rows (hinted, plain) from the span's first used
column, so short plain rows do not read the hinted rows' long padding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from onsft.engine.kv_cache import span_attention
from onsft.engine.rows import RowBatch
from onsft.errors import UserError
from onsft.formulas.sampling import RepetitionDetector, example_generator, sample_tokens

FINISH_REASONS = ("eos", "stop", "length", "repetition")


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


# ---------------------------------------------------------------------------------------------
# The decoding loop shared by `generate` and `onsft.engine.hinted.hinted_decode`
# ---------------------------------------------------------------------------------------------

# mixer(hinted_logprobs [N, V], plain_logprobs [N, V]) -> (mixed scores [N, V], lambda [N])
Mixer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Trace:
    """What the loop records per example; `generate` and `hinted_decode` turn it into their results."""

    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    lambdas: list[float] = field(default_factory=list)
    handover_step: int | None = None


def stop_token_ids(model, tokenizer) -> list[int]:
    """EOS ids from the model's generation config (may be several) and the tokenizer."""
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


def decode_examples(
    model,
    tokenizer,
    plain_ids: list[list[int]],
    hinted_ids: list[list[int]] | None,
    config: SamplingConfig,
    mixer: Mixer | None = None,
    answer_marker: str = "",
    hinted_first: bool = True,
    progress: Callable[[int], None] | None = None,
) -> list[Trace]:
    """Decode every example; returns traces in input order.

    With `hinted_ids`, example i has a hinted row and a plain row; each step's distribution is
    `mixer(hinted, plain)`, except the first step (hinted alone, when `hinted_first`) and every step
    after `answer_marker` appeared in the generated text (plain alone; the hinted row is dropped).
    Without `hinted_ids` each example has its plain row only: ordinary decoding.
    """
    config.validate()
    if hinted_ids is not None and mixer is None:
        raise ValueError("decoding with hinted contexts needs a mixer (see onsft.engine.hinted.make_mixer)")
    if hinted_ids is not None and len(hinted_ids) != len(plain_ids):
        raise UserError(
            f"{len(hinted_ids)} hinted prompts for {len(plain_ids)} plain prompts",
            where="hinted decoding",
            fix="pass one hinted prompt per plain prompt.",
        )
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
    # Similar lengths together waste less padding; results do not depend on the grouping.
    lead = hinted_ids if hinted_ids is not None else plain_ids
    order = sorted(range(len(plain_ids)), key=lambda i: (-len(lead[i]), -len(plain_ids[i]), i))
    traces: list[Trace | None] = [None] * len(plain_ids)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), span_attention(model):
            for start in range(0, len(order), config.batch_size):
                batch = order[start : start + config.batch_size]
                done = _decode_batch(
                    model, tokenizer, batch, plain_ids, hinted_ids, config, mixer, answer_marker, hinted_first, limit
                )
                for i, trace in zip(batch, done):
                    traces[i] = trace
                if progress is not None:
                    progress(len(batch))
    finally:
        model.train(was_training)
    return traces  # type: ignore[return-value]


def _decode_batch(
    model, tokenizer, batch, plain_ids, hinted_ids, config, mixer, answer_marker, hinted_first, limit
) -> list[Trace]:
    n = len(batch)
    hinted = hinted_ids is not None
    prompts = ([hinted_ids[i] for i in batch] if hinted else []) + [plain_ids[i] for i in batch]
    groups = [range(0, n), range(n, 2 * n)] if hinted else [range(n)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = RowBatch(model, prompts, use_cache=config.use_cache, pad_id=pad_id, prefill_groups=groups)
    device = rows.logprobs.device
    stops = torch.tensor(stop_token_ids(model, tokenizer), dtype=torch.long, device=device)
    stop_set = set(stops.tolist())
    generators = [example_generator(config.seed, i, device) for i in batch]
    detectors = [RepetitionDetector(config.repetition_window, config.repetition_count) for _ in batch]
    traces = [Trace() for _ in batch]
    # A row's positions grow from its own prompt length; the longest row of an example meets the
    # model's context first.
    room = [max(len(plain_ids[i]), len(hinted_ids[i]) if hinted else 0) for i in batch]
    # Row of each context of each example in the current RowBatch (-1 = that row is gone).
    hinted_row = list(range(n)) if hinted else [-1] * n
    plain_row = [j + n for j in range(n)] if hinted else list(range(n))
    active = list(range(n))
    # Tokens decoded to look for the marker and stop strings: each token is >= 1 character, plus margin.
    text_tail = max([len(answer_marker), *map(len, config.stop_strings)]) + 32
    for step in range(config.max_new_tokens):
        h_rows = torch.tensor([hinted_row[j] for j in active], device=device)
        p_rows = torch.tensor([plain_row[j] for j in active], device=device)
        plain_lp = rows.logprobs[p_rows]
        has_hint = h_rows >= 0
        if bool(has_hint.any()):
            hint_lp = rows.logprobs[torch.where(has_hint, h_rows, p_rows)]
            if step == 0 and hinted_first:
                scores, lam = hint_lp, torch.zeros(len(active), device=device)
            else:
                scores, lam = mixer(hint_lp, plain_lp)
            # Examples whose hinted row is gone decode the plain context alone.
            scores = torch.where(has_hint[:, None], scores, plain_lp)
            lam = torch.where(has_hint, lam, torch.ones_like(lam))
        else:
            scores, lam = plain_lp, torch.ones(len(active), device=device)
        if step < config.min_new_tokens and stops.numel():
            scores = scores.index_fill(-1, stops, float("-inf"))
        tokens = sample_tokens(scores, config, [generators[j] for j in active]).tolist()
        lam_list = lam.tolist()

        still = []
        for slot, j in enumerate(active):
            token, trace = tokens[slot], traces[j]
            trace.token_ids.append(token)
            trace.lambdas.append(lam_list[slot])
            watch_marker = hinted_row[j] >= 0 and bool(answer_marker)
            # Strings are looked for in the decoded tail only: they first appear ending at this token.
            tail = (
                tokenizer.decode(trace.token_ids[-text_tail:], skip_special_tokens=False)
                if watch_marker or config.stop_strings
                else ""
            )
            reason = None
            if token in stop_set:
                reason = "eos"
            elif any(stop in tail for stop in config.stop_strings):
                reason = "stop"
            elif len(trace.token_ids) >= config.max_new_tokens or (limit and room[j] + len(trace.token_ids) >= limit):
                reason = "length"
            elif detectors[j].push(token):
                reason = "repetition"
            if reason is not None:
                trace.finish_reason = reason
                continue
            still.append(j)
            if watch_marker:
                if answer_marker in tail:
                    trace.handover_step = step + 1  # the first step decoded by the plain context alone
                    hinted_row[j] = -1
        if not still:
            break
        # Surviving rows keep their relative order, so selecting them is one sorted index_select.
        pairs = sorted(
            (row, traces[j].token_ids[-1]) for j in still for row in (hinted_row[j], plain_row[j]) if row >= 0
        )
        renumber = {old: new for new, (old, _) in enumerate(pairs)}
        for j in still:
            hinted_row[j] = renumber[hinted_row[j]] if hinted_row[j] >= 0 else -1
            plain_row[j] = renumber[plain_row[j]]
        keep = None if len(pairs) == rows.rows else torch.tensor([row for row, _ in pairs])
        rows.advance(keep, torch.tensor([token for _, token in pairs]))
        active = still
    return traces


def generate(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    config: SamplingConfig | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[Generation]:
    """Sample one continuation per prompt (token ids), batched, stopping per row at EOS, a stop string,
    `max_new_tokens` or a repetition loop. Results do not depend on `batch_size` (nor, for greedy
    decoding, on the order of the prompts)."""
    config = config or SamplingConfig()
    traces = decode_examples(model, tokenizer, prompt_ids, None, config, progress=progress)
    return [
        Generation(
            token_ids=t.token_ids,
            text=tokenizer.decode(t.token_ids, skip_special_tokens=True),
            finish_reason=t.finish_reason,
            n_tokens=len(t.token_ids),
        )
        for t in traces
    ]


def sample_own(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, seed: int) -> list[Generation]:
    """The model's own samples at temperature 1 over the full vocabulary, with no stop rule but EOS and the
    limit (the on-policy baseline of DDT). Sample i depends only on (seed, i)."""
    config = SamplingConfig(
        max_new_tokens=max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        seed=seed,
        repetition_count=0,
        batch_size=max(1, len(prompts)),
    )
    return generate(model, tokenizer, prompts, config)
