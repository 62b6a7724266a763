"""The decoding loop shared by plain generation and hinted decoding: examples flow through row slots.

A run holds `batch_size` examples' worth of row slots (one row per example, two in hinted decoding).
With the continuous schedule (the default), a slot freed by a finished example (or by a hinted row at
the hand-over) takes the next pending example as soon as a whole example fits: its prompt is
prefilled into the slot while the other rows keep their caches, and decoding goes on with a full
batch. The static schedule admits a new batch only when every example of the last one has finished
(the old behaviour, kept for benchmarks). Either way an example's tokens depend only on its prompts,
the settings and its own random stream (`example_generator(seed, id)`), never on its neighbours, the
batch size or the order of arrival: every per-example quantity (its step, its token limit, its first
hinted-only step, the EOS floor) is counted per example, not per batch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from onsft.engine.kv_cache import CopyCounter
from onsft.engine.row_batch import RowBatch
from onsft.formulas.sampling import RepetitionDetector, example_generator, sample_tokens

SCHEDULES = ("continuous", "static")
HINTED, PLAIN = 0, 1  # the context of a row key (example, context)

# mixer(hinted_logprobs [N, V], plain_logprobs [N, V]) -> (mixed scores [N, V], lambda [N])
Mixer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Trace:
    """What the loop records per example; `generate` and `hinted_decode` turn it into their results."""

    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    lambdas: list[float] = field(default_factory=list)
    handover_step: int | None = None


@dataclass
class DecodeStats:
    """What a run did, for benchmarks: decoding forward passes, the rows they carried (a static batch's
    idle slots carry none), admissions and their prompts, and the KV-cache copies (`copies`)."""

    decode_steps: int = 0
    row_steps: int = 0
    slots: int = 0
    admissions: int = 0
    admitted_examples: int = 0
    copies: CopyCounter = field(default_factory=CopyCounter)

    @property
    def idle_share(self) -> float:
        """Share of slot-steps that carried no row."""
        return 1 - self.row_steps / max(self.decode_steps * self.slots, 1)


@dataclass
class _Example:
    trace: Trace
    generator: torch.Generator
    detector: RepetitionDetector
    room: int  # the longest prompt of the example: it meets the model's context first
    limit: int
    hinted: bool


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


def run_examples(
    model,
    tokenizer,
    order: list[int],
    plain_ids: list[list[int]],
    hinted_ids: list[list[int]] | None,
    config,
    *,
    mixer: Mixer | None,
    answer_markers: tuple[str, ...],
    hinted_first: bool,
    marker_before_stop: bool,
    context: int | None,
    schedule: str,
    prefixes: list[list[int]],
    seeds: list[int],
    limits: list[int],
    progress: Callable[[int], None] | None,
    stats: DecodeStats,
) -> dict[int, Trace]:
    """Decode the examples in `order` (their admission order); returns each example's trace."""
    hinted = hinted_ids is not None
    # marker_before_stop: no stop while an example's hinted row leads (only hinted decoding with a marker has one).
    hold = marker_before_stop and hinted and bool(answer_markers)
    per_example = 2 if hinted else 1
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = RowBatch(
        model,
        use_cache=config.use_cache,
        pad_id=pad_id,
        capacity=per_example * config.batch_size,
        groups=per_example,
        shared_prefixes=prefixes,
    )
    if rows.cache is not None:
        stats.copies = rows.cache.copies
    stats.slots = rows.capacity
    device = rows.device
    stops = torch.tensor(stop_token_ids(model, tokenizer), dtype=torch.long, device=device)
    stop_set = set(stops.tolist())
    is_stop = torch.zeros(0, dtype=torch.bool, device=device)
    # Tokens decoded to look for the marker and stop strings: each token is >= 1 character, plus margin.
    text_tail = max([*map(len, answer_markers), *map(len, config.stop_strings)], default=0) + 32
    pending, live = deque(order), []
    examples: dict[int, _Example] = {}
    traces: dict[int, Trace] = {}
    while pending or live:
        if pending and (schedule == "continuous" or not live):
            take = []
            while pending and rows.can_admit(per_example * (len(take) + 1)):
                take.append(pending.popleft())
            if take:
                entries = [((i, HINTED), 0, hinted_ids[i]) for i in take] if hinted else []
                entries += [((i, PLAIN), per_example - 1, plain_ids[i]) for i in take]
                rows.admit(entries)
                for i in take:
                    traces[i] = Trace()
                    examples[i] = _Example(
                        trace=traces[i],
                        generator=example_generator(config.seed, seeds[i], device),
                        detector=RepetitionDetector(config.repetition_window, config.repetition_count),
                        room=max(len(plain_ids[i]), len(hinted_ids[i]) if hinted else 0),
                        limit=limits[i],
                        hinted=hinted,
                    )
                live += take
                stats.admissions += 1
                stats.admitted_examples += len(take)
        scores, lam = _scores(rows, live, examples, mixer, hinted_first)
        if (config.min_new_tokens or hold) and stops.numel():
            if is_stop.numel() != scores.shape[-1]:
                is_stop = torch.zeros(scores.shape[-1], dtype=torch.bool, device=device).index_fill(0, stops, True)
            # No stop before min_new_tokens, nor (marker_before_stop) while the hinted context still leads: the
            # answer after the marker is then always the plain context's.
            early = torch.tensor(
                [
                    len(examples[i].trace.token_ids) < config.min_new_tokens or (hold and examples[i].hinted)
                    for i in live
                ],
                device=device,
            )
            scores = scores.masked_fill(early[:, None] & is_stop[None, :], float("-inf"))
        tokens = sample_tokens(scores, config, [examples[i].generator for i in live]).tolist()
        lam_list = lam.tolist()

        still, leaving, finished = [], [], 0
        for slot, i in enumerate(live):
            token, example = tokens[slot], examples[i]
            trace = example.trace
            trace.token_ids.append(token)
            trace.lambdas.append(lam_list[slot])
            watch_marker = example.hinted and bool(answer_markers)
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
            elif len(trace.token_ids) >= example.limit or (context and example.room + len(trace.token_ids) >= context):
                reason = "length"
            elif example.detector.push(token):
                reason = "repetition"
            if reason is not None:
                trace.finish_reason = reason
                leaving += [(i, HINTED)] if example.hinted else []
                leaving.append((i, PLAIN))
                finished += 1
                del examples[i]
                continue
            still.append(i)
            if watch_marker and any(marker in tail for marker in answer_markers):
                trace.handover_step = len(trace.token_ids)  # the first step decoded by the plain context alone
                example.hinted = False
                leaving.append((i, HINTED))
        if leaving:
            rows.retire(leaving)
        if progress is not None and finished:
            progress(finished)
        live = still
        if live:
            # Every live row takes its example's new token.
            rows.step(torch.tensor([traces[key[0]].token_ids[-1] for key in rows.keys]))
            stats.decode_steps += 1
            stats.row_steps += rows.rows
    return traces


def _scores(rows: RowBatch, live: list[int], examples: dict[int, _Example], mixer, hinted_first: bool):
    """Each live example's next-token scores and lambda: the plain row's alone, or hinted decoding's
    mixture while the example still has its hinted row (its first token from the hinted row alone)."""
    device = rows.logprobs.device
    plain_lp = rows.logprobs[torch.tensor([rows.row_of[(i, PLAIN)] for i in live], device=device)]
    has_hint = [examples[i].hinted for i in live]
    if not any(has_hint):
        return plain_lp, torch.ones(len(live), device=device)
    hint_rows = [rows.row_of[(i, HINTED) if examples[i].hinted else (i, PLAIN)] for i in live]
    hint_lp = rows.logprobs[torch.tensor(hint_rows, device=device)]
    scores, lam = mixer(hint_lp, plain_lp)
    if hinted_first:
        first = torch.tensor([not examples[i].trace.token_ids for i in live], device=device)
        scores = torch.where(first[:, None], hint_lp, scores)
        lam = torch.where(first, torch.zeros_like(lam), lam)
    # Examples whose hinted row is gone decode the plain context alone.
    has_hint = torch.tensor(has_hint, device=device)
    scores = torch.where(has_hint[:, None], scores, plain_lp)
    lam = torch.where(has_hint, lam, torch.ones_like(lam))
    return scores, lam
