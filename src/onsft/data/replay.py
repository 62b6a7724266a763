"""Replay: a fixed share of every optimiser batch taken from the starting model's own answers to other prompts
(`onsft data replay` writes such a set), the usual practical guard against forgetting.

The mix is decided before training, as one fixed order of rows: block b (rows b*B .. (b+1)*B - 1, B the
optimiser batch: per-device batch x accumulation x processes) holds r = round(share * B) replay rows and
B - r training rows, shuffled within the block. Training rows are drawn epoch by epoch from a fresh
permutation each epoch (seed, epoch); replay rows likewise cycle through their own permutations. The
trainer then reads the rows in this order (a sequential sampler) for exactly the planned number of steps,
so every optimiser batch holds the share, and a resumed run (which skips the batches already trained)
sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import random

from onsft.data.chat import encode_examples
from onsft.data.rows import load_examples
from onsft.errors import UserError

# The column `onsft data replay` writes: which model answered (a replay set is only on-policy for that one).
MODEL_COLUMN = "replay_model"


def replay_rows_per_batch(share: float, batch_rows: int, where: str = "--replay_share") -> int:
    """r = round(share * B), refused when it leaves no replay row or no training row in a batch."""
    if not 0 < share < 1:
        raise UserError(
            f"replay_share must be in (0, 1), got {share}", where=where, fix="pass e.g. --replay_share 0.25."
        )
    rows = round(share * batch_rows)
    if not 1 <= rows <= batch_rows - 1:
        raise UserError(
            f"replay_share {share} of an optimiser batch of {batch_rows} rows gives {rows} replay rows",
            where=where,
            fix="choose a share that leaves at least one replay row and one training row per batch, or change "
            "the batch size (per_device_train_batch_size x gradient_accumulation_steps x processes).",
        )
    return rows


def planned_steps(max_steps: int, epochs: float, n_train: int, train_per_batch: int) -> int:
    """Optimiser steps of the mixed run: `max_steps` when set (> 0), else enough batches to show every training
    row `epochs` times."""
    if max_steps > 0:
        return max_steps
    return max(1, math.ceil(epochs * n_train / train_per_batch))


def _stream(n: int, rng_seed: int):
    """Indices 0..n-1, a fresh permutation for every pass (pass e uses seed (rng_seed, e))."""
    epoch = 0
    while True:
        order = list(range(n))
        random.Random(f"{rng_seed}:{epoch}").shuffle(order)
        yield from order
        epoch += 1


def mixed_order(
    n_train: int, n_replay: int, batch_rows: int, replay_per_batch: int, steps: int, seed: int
) -> list[int]:
    """Row indices into [training rows..., replay rows...] (replay row j is n_train + j), `steps` blocks of
    `batch_rows`, each with exactly `replay_per_batch` replay rows (module docstring)."""
    train, replay = _stream(n_train, seed), _stream(n_replay, seed + 1_000_003)
    block_rng = random.Random(f"blocks:{seed}")
    order: list[int] = []
    for _ in range(steps):
        block = [next(train) for _ in range(batch_rows - replay_per_batch)]
        block += [n_train + next(replay) for _ in range(replay_per_batch)]
        block_rng.shuffle(block)  # replay rows spread over the micro-batches of the block
        order += block
    return order


def mix_batches(train_table, replay_table, batch_rows: int, share: float, steps: int, seed: int):
    """(the mixed `datasets.Dataset` in training order, what was mixed) for `steps` optimiser batches."""
    import datasets

    replay_per_batch = replay_rows_per_batch(share, batch_rows)
    order = mixed_order(len(train_table), len(replay_table), batch_rows, replay_per_batch, steps, seed)
    mixed = datasets.concatenate_datasets([train_table, replay_table]).select(order)
    info = {
        "replay_rows_per_batch": replay_per_batch,
        "batch_rows": batch_rows,
        "share": replay_per_batch / batch_rows,
        "steps": steps,
        "replay_rows_available": len(replay_table),
        "replay_rows_used": steps * replay_per_batch,
    }
    return mixed, info


def _prompt_key(example) -> str:
    return json.dumps(example.prompt, sort_keys=True)


def replay_dataset(tokenizer, path: str, train_path: str, model: str, max_length: int, overlong: str):
    """The replay set encoded like training data (`datasets.Dataset`, counts), refused when it answers the
    training prompts themselves, or names another model than the one trained as the one that answered."""
    import datasets

    examples = load_examples(path, require_response=True)
    for example in examples:
        answered_by = example.record.get(MODEL_COLUMN)
        if answered_by is not None and answered_by != model:
            raise UserError(
                f"replay row was answered by `{answered_by}`, but the model trained is `{model}`",
                where=path,
                line=example.line,
                fix=f"write the replay set with `onsft data replay --model {model}` (replay is the starting "
                f"model's own answers), or drop the `{MODEL_COLUMN}` column to replay other answers knowingly.",
            )
    trained = {_prompt_key(e) for e in load_examples(train_path, require_response=True)}
    shared = [e for e in examples if _prompt_key(e) in trained]
    if shared:
        raise UserError(
            f"{len(shared)} replay row(s) answer prompts of the training data",
            where=path,
            line=shared[0].line,
            fix="draw the replay prompts from other prompts than --data (replay keeps other skills).",
        )
    encoded, stats = encode_examples(tokenizer, examples, max_length, overlong, where=path)
    table = datasets.Dataset.from_dict(
        {"input_ids": [e.input_ids for e in encoded], "labels": [e.labels for e in encoded]}
    )
    stats["lengths"] = [(len(e.input_ids), e.line) for e in encoded]
    return table, stats
