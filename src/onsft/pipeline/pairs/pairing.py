"""Preference pairs from evaluated rows: a verified correct response as chosen, the model's own wrong sample
as rejected (the paper's DPO / SimPO baseline data)."""

from __future__ import annotations

import itertools
import json

from onsft.data.rows import Example, load_examples
from onsft.errors import UserError

FORMATS = ("conversational", "standard")


def prompt_key(example: Example) -> str:
    return json.dumps(example.prompt, sort_keys=True, ensure_ascii=False)


def load_rewrites(path: str, column: str | None) -> dict[str, list[str]]:
    """Rewritten responses by key: `id:<id>` and `prompt:<turns>` (a row may carry several)."""
    examples = load_examples(path, require_response=column is None, flag="--rewrites")
    found: dict[str, list[str]] = {}
    for example in examples:
        response = example.response if column is None else example.record.get(column)
        if response is None:
            raise UserError(
                f"rewrite row has no `{column}` column",
                where=path,
                line=example.line,
                fix="name the response column with --rewrite_field.",
            )
        if not isinstance(response, str) or not response.strip():
            continue
        keys = [f"prompt:{prompt_key(example)}"]
        if example.record.get("id") is not None:
            keys.append(f"id:{example.record['id']}")
        for key in keys:
            found.setdefault(key, []).append(response)
    return found


def make_pairs(
    row: dict,
    example: Example,
    candidates: list[tuple[str, str]],
    verifier,
    pairs_per_prompt: int,
    tokenizer=None,
    fmt: str = "conversational",
) -> tuple[list[dict], str]:
    """Pairs of one evaluated row (its `samples`, each with `correct`). `candidates` are (source, text)
    fallbacks for chosen, tried in order and used only when the verifier accepts them.
    Returns (pairs, outcome) where outcome names why a prompt gave no pair."""
    samples = row.get("samples", [])
    wrong, seen = [], set()
    for sample in samples:
        if not sample["correct"] and sample["text"] not in seen and sample["text"].strip():
            seen.add(sample["text"])
            wrong.append(sample)
    if not wrong:
        # Empty wrong samples (e.g. only special tokens) make no useful rejected response.
        return [], "all_samples_correct" if all(s["correct"] for s in samples) else "wrong_samples_empty"
    chosen = list(dict.fromkeys(s["text"] for s in samples if s["correct"]))
    source = "own_sample"
    if not chosen:
        verified = next(((s, t) for s, t in candidates if t and t.strip() and verifier(t, example.answer)), None)
        if verified is None:
            return [], "no_correct_response"
        source, chosen = verified[0], [verified[1]]
    pairs = []
    for good, bad in zip(itertools.cycle(chosen), wrong[:pairs_per_prompt]):
        pair = _format_pair(example.prompt, good, bad["text"], tokenizer, fmt)
        pair.update(
            chosen_source=source,
            source_index=example.index,
            n_samples=len(samples),
            n_correct=sum(s["correct"] for s in samples),
            rejected_finish_reason=bad["finish_reason"],
        )
        for key in ("id", "task"):
            if example.record.get(key) is not None:
                pair[key] = example.record[key]
        if example.answer is not None:
            pair["answer"] = example.answer
        pairs.append(pair)
    return pairs, f"pair_from_{source}"


def _format_pair(prompt: list[dict], chosen: str, rejected: str, tokenizer, fmt: str) -> dict:
    if fmt == "conversational":
        return {
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        }
    text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    return {"prompt": text, "chosen": chosen, "rejected": rejected}


def chosen_candidates(example: Example, rewrites: dict[str, list[str]], use_reference: bool) -> list[tuple[str, str]]:
    """The fallbacks for chosen when no own sample is correct: the example's rewrites (matched by id, else by
    prompt), then its own reference response."""
    candidates = []
    if rewrites:
        keys = ([f"id:{example.record['id']}"] if example.record.get("id") is not None else []) + [
            f"prompt:{prompt_key(example)}"
        ]
        candidates += [("rewrite", t) for t in next((rewrites[k] for k in keys if k in rewrites), [])]
    if use_reference and example.response:
        candidates.append(("reference", example.response))
    return candidates
