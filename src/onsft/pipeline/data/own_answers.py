"""The starting model's own answers to prompts: the rows `onsft data replay` writes and `--replay_data` mixes
into training (`onsft.data.replay`).

Each prompt gets one sample from the model at `OwnSamplingConfig`'s settings (temperature 1 over the full
vocabulary by default: the model's own distribution). Prompts are decoded in fixed chunks whose seed
depends on the chunk's first row only, so a resumed run samples the same. Answers that did not end (the
token limit, a repetition loop) are dropped unless asked for: training on them with the chat template's
end-of-turn appended would teach an ending the model did not choose. Empty answers are always dropped.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence

from onsft.data.replay import MODEL_COLUMN
from onsft.data.rows import Example
from onsft.engine.decoding import SamplingConfig, generate
from onsft.pipeline.evaluate.evaluation import check_prompts
from onsft.runtime.device import stream_seed
from onsft.runtime.models import context_length
from onsft.runtime.progress import note_resume, progress
from onsft.runtime.records import ResumableJsonl

KEPT_COLUMNS = ("id", "task", "answer")


def sample_answers(
    model,
    tokenizer,
    examples: Sequence[Example],
    sampling: SamplingConfig,
    store: ResumableJsonl | None = None,
    where: str = "data",
    show_progress: bool = True,
) -> list[dict]:
    """One sampled answer per example: {"_index", "prompt" (turns), "completion", "finish_reason", "n_tokens"}
    plus the row's id / task / answer when present; rows the store already holds are not sampled again."""
    done = store.done if store is not None else {}
    rows = {i: done[e.index] for i, e in enumerate(examples) if e.index in done}
    context = context_length(model)
    if store is not None:
        note_resume("data replay", len(rows), len(examples), store.partial)
    with progress(len(examples), "replay", show_progress, unit="prompt", initial=len(rows)) as bar:
        for start in range(0, len(examples), sampling.batch_size):
            todo = list(range(start, min(start + sampling.batch_size, len(examples))))
            fresh = [i for i in todo if i not in rows]
            if not fresh:
                continue
            # The whole chunk is decoded even when part of it is on disk: its samples depend on the chunk.
            prompts = check_prompts(tokenizer, [examples[i] for i in todo], context, where)
            seed = stream_seed("replay", "samples", sampling.seed, examples[start].index)
            outputs = generate(model, tokenizer, prompts, dataclasses.replace(sampling, seed=seed))
            new = {}
            for i, generation in zip(todo, outputs):
                example = examples[i]
                new[i] = {
                    "_index": example.index,
                    "prompt": example.prompt,
                    "completion": generation.text,
                    "finish_reason": generation.finish_reason,
                    "n_tokens": generation.n_tokens,
                    **{k: example.record[k] for k in KEPT_COLUMNS if example.record.get(k) is not None},
                }
            if store is not None:
                store.append_many([new[i] for i in fresh])
            rows.update({i: new[i] for i in fresh})
            bar.update(len(fresh))
    return [rows[i] for i in range(len(examples))]


REASONS = {
    "empty": "empty",
    "unfinished_length": "cut at --max_new_tokens",
    "unfinished_repetition": "stopped repeating",
}


def dropped_text(dropped: dict[str, int]) -> str:
    """`{"empty": 1, "unfinished_length": 3}` -> "1 empty, 3 cut at --max_new_tokens": words, not a Python dict."""
    return ", ".join(f"{n} {REASONS.get(reason, reason.replace('_', ' '))}" for reason, n in dropped.items())


def replay_rows(samples: Sequence[dict], model: str, keep_unfinished: bool) -> tuple[list[dict], dict]:
    """The samples worth training on, each marked with the model that answered, and why others were dropped."""
    kept, dropped = [], Counter()
    for sample in samples:
        if not sample["completion"].strip():
            dropped["empty"] += 1
        elif sample["finish_reason"] not in ("eos", "stop") and not keep_unfinished:
            dropped[f"unfinished_{sample['finish_reason']}"] += 1
        else:
            row = {k: v for k, v in sample.items() if k != "_index"}
            kept.append({**row, "source_index": sample["_index"], MODEL_COLUMN: model})
    return kept, dict(sorted(dropped.items()))
