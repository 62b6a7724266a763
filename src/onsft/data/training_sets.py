"""Training sets: rows encoded for SFT (prompt masked in `labels`) and preference pairs for DPO / SimPO,
both validated up front so every problem names its file and line before a model is loaded."""

from __future__ import annotations

from collections import Counter

from onsft.data.chat import char_budget, encode_examples, encode_prompt, encode_response
from onsft.data.rows import load_examples, read_rows
from onsft.errors import UserError, warn


def sft_dataset(tokenizer, path: str, max_length: int, overlong: str):
    """(`datasets.Dataset` of input_ids / labels, counts incl. response tokens and (length, line) per row)."""
    import datasets

    examples = load_examples(path, require_response=True)
    encoded, stats = encode_examples(tokenizer, examples, max_length, overlong, where=path)
    table = datasets.Dataset.from_dict(
        {"input_ids": [e.input_ids for e in encoded], "labels": [e.labels for e in encoded]}
    )
    stats["response_tokens"] = sum(sum(1 for t in e.labels if t != -100) for e in encoded)
    stats["lengths"] = [(len(e.input_ids), e.line) for e in encoded]
    return table, stats


def _as_messages(value, column: str, where: str, line: int, role: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if (
        isinstance(value, list)
        and value
        and all(
            isinstance(t, dict) and isinstance(t.get("content"), str) and isinstance(t.get("role"), str) for t in value
        )
    ):
        return [{"role": t["role"], "content": t["content"]} for t in value]
    raise UserError(
        f"column `{column}` must be text or a list of {{role, content}} turns",
        where=where,
        line=line,
        fix="write pairs as `onsft pairs` does (TRL's preference format).",
    )


def preference_dataset(path: str, tokenizer, max_length: int | None, overlong: str = "reject"):
    """Validated pairs as a `datasets.Dataset` with prompt / chosen / rejected, and counts. Every problem
    (no pairs, a missing column, a row over `max_length` under `reject`) is a `UserError` naming the line."""
    import datasets

    rows = read_rows(path)
    if not rows:
        raise UserError("pairs file has no pairs", where=path, fix="run `onsft pairs` (it says why no pair was made).")
    if overlong not in ("reject", "truncate", "drop"):
        raise UserError(
            f"unknown --overlong value `{overlong}`", where="command line", fix="use reject, truncate or drop."
        )
    table = {"prompt": [], "chosen": [], "rejected": []}
    stats = Counter(rows=len(rows))
    too_long: list[tuple[int, str]] = []
    standard = None
    for line, row in rows:
        if not isinstance(row, dict) or any(row.get(k) is None for k in table):
            missing = [k for k in table if not isinstance(row, dict) or row.get(k) is None]
            raise UserError(
                f"pair has no {', '.join(f'`{k}`' for k in missing)}",
                where=path,
                line=line,
                fix="every row needs prompt, chosen and rejected.",
            )
        is_standard = all(isinstance(row[k], str) for k in table)
        if standard is None:
            standard = is_standard
        elif standard != is_standard:
            raise UserError(
                "pairs mix the standard (text) and conversational (turns) formats",
                where=path,
                line=line,
                fix="write every row in one format.",
            )
        size = max(len(str(row["prompt"])) + len(str(row[k])) for k in ("chosen", "rejected"))
        if max_length is not None and size > char_budget(tokenizer, max_length):
            # Far past max_length by its characters alone: never tokenised (a huge row would take gigabytes).
            if overlong == "reject":
                too_long.append((line, f"{size:,} characters"))
            else:
                stats["dropped"] += 1
            continue
        if is_standard:
            prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            lengths = [
                len(tokenizer(prompt + r, add_special_tokens=False)["input_ids"]) + 1 for r in (chosen, rejected)
            ]
            texts = (chosen, rejected)
        else:
            prompt = _as_messages(row["prompt"], "prompt", path, line, "user")
            chosen = _as_messages(row["chosen"], "chosen", path, line, "assistant")
            rejected = _as_messages(row["rejected"], "rejected", path, line, "assistant")
            ids = encode_prompt(tokenizer, prompt, path)
            texts = (chosen[-1]["content"], rejected[-1]["content"])
            lengths = [len(ids) + len(encode_response(tokenizer, prompt, t, ids)) for t in texts]
        if not all(t.strip() for t in texts):
            raise UserError(
                "chosen or rejected response is empty",
                where=path,
                line=line,
                fix="remove the row or give it non-empty responses.",
            )
        if texts[0] == texts[1]:  # a pair whose chosen is its rejected has zero gradient: it teaches nothing
            stats["identical"] += 1
            stats.setdefault("first_identical", line)
            continue
        if max_length is not None and max(lengths) > max_length:
            if overlong == "reject":
                too_long.append((line, f"{max(lengths)} tokens"))
                continue
            if overlong == "drop" or len(ids) >= max_length:
                stats["dropped"] += 1
                continue
            stats["truncated"] += 1
        table["prompt"].append(prompt)
        table["chosen"].append(chosen)
        table["rejected"].append(rejected)
    if too_long:
        line, n = too_long[0]
        raise UserError(
            f"{len(too_long)} of {len(rows)} pairs are longer than max_length={max_length} (first: {n})",
            where=path,
            line=line,
            fix="raise --max_length, or pass --overlong truncate (cut responses) or drop (skip pairs).",
        )
    if stats["identical"]:
        if stats["identical"] == len(rows):
            raise UserError(
                f"every pair ({len(rows)}) has chosen equal to rejected: nothing to prefer",
                where=path,
                line=stats["first_identical"],
                fix="rebuild the pairs (`onsft pairs` never writes such a pair) or fix the rejected responses.",
            )
        warn(
            f"{stats['identical']} of {len(rows)} pairs have chosen equal to rejected (first on line "
            f"{stats['first_identical']}); they teach nothing and are left out",
            where=path,
        )
    if not table["prompt"]:
        raise UserError(
            "no pairs left to train on after dropping over-long pairs", where=path, fix="raise --max_length."
        )
    return datasets.Dataset.from_dict(table), dict(stats)
