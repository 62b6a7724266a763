"""Tokenising rows with the model's chat template: prompt ids, response ids, and the over-long policy.

A response is what the model must emit after the prompt (end-of-turn tokens included), so training
masks the prompt with -100 and scoring reads the response positions only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from onsft.data.rows import Example, Messages
from onsft.errors import UserError

OVERLONG = ("reject", "truncate", "drop")
OVERLONG_HELP = (
    "Rows longer than max_length: `reject` (stop with a count, the default), `truncate` (cut the response's tail, "
    "never the prompt), or `drop` (skip them, with a count)."
)


def _check_chat_template(tokenizer, where: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        # The model folder is what needs fixing, not the data file the caller was reading.
        where = getattr(tokenizer, "name_or_path", None) or where
        raise UserError(
            "the model's tokenizer has no chat template",
            where=where,
            fix="use an instruction model, or set `chat_template` in its tokenizer_config.json.",
        )


def _ids(encoded) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True); older versions a list.
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def encode_prompt(tokenizer, prompt: Messages, where: str = "model") -> list[int]:
    """Token ids of the chat prompt ending with the assistant header: what the model sees at test time."""
    _check_chat_template(tokenizer, where)
    return _ids(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True))


def encode_response(tokenizer, prompt: Messages, response: str, prompt_ids: list[int] | None = None) -> list[int]:
    """Token ids the model must emit after the prompt, end-of-turn tokens included.

    Where the template renders the full chat with the prompt as a prefix (most templates), the response is
    the rest of the rendered chat, so end-of-turn markers are learned exactly as the template writes them.
    Otherwise (templates that rewrite earlier turns) it falls back to the text plus EOS.
    """
    prompt_ids = prompt_ids if prompt_ids is not None else encode_prompt(tokenizer, prompt)
    full = _ids(tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=True))
    if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
        return full[len(prompt_ids) :]
    ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    return ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # -100 on prompt tokens
    prompt_length: int
    truncated: bool = False
    line: int | None = None  # the row's line in its file, for error messages
    index: int | None = None  # the row's position in its file


def _fit(
    prompt_ids: list[int], response_ids: list[int], example: Example, max_length: int, overlong: str, where: str
) -> Encoded | None:
    """Apply the over-long policy to one row (None = dropped). `reject` is handled by the caller, which counts."""
    truncated = False
    if len(prompt_ids) + len(response_ids) > max_length:
        if overlong == "drop":
            return None
        if len(prompt_ids) >= max_length:
            raise UserError(
                f"prompt alone has {len(prompt_ids)} tokens, so the whole response is past max_length={max_length}",
                where=where,
                line=example.line,
                fix="raise --max_length, shorten the prompt, or use --overlong drop.",
            )
        response_ids = response_ids[: max_length - len(prompt_ids)]
        truncated = True
    return Encoded(
        prompt_ids + response_ids,
        [-100] * len(prompt_ids) + response_ids,
        len(prompt_ids),
        truncated,
        example.line,
        example.index,
    )


def encode_examples(
    tokenizer, examples: Sequence[Example], max_length: int, overlong: str = "reject", where: str = "data"
) -> tuple[list[Encoded], dict[str, int]]:
    """Encode all rows. Under `reject`, every over-long row is counted before stopping, so one run says how many."""
    if overlong not in ("reject", "truncate", "drop"):
        raise UserError(
            f"unknown --overlong value `{overlong}`", where="command line", fix="use reject, truncate or drop."
        )
    encoded, stats = [], {"rows": len(examples), "dropped": 0, "truncated": 0}
    too_long: list[tuple[int, int]] = []
    for example in examples:
        prompt_ids = encode_prompt(tokenizer, example.prompt, where)
        response_ids = encode_response(tokenizer, example.prompt, example.response or "", prompt_ids)
        total = len(prompt_ids) + len(response_ids)
        if overlong == "reject" and total > max_length:
            too_long.append((example.line, total))
            continue
        item = _fit(prompt_ids, response_ids, example, max_length, overlong, where)
        if item is None:
            stats["dropped"] += 1
            continue
        stats["truncated"] += int(item.truncated)
        encoded.append(item)
    if too_long:
        line, n = too_long[0]
        raise UserError(
            f"{len(too_long)} of {len(examples)} rows are longer than max_length={max_length} (first: {n} tokens)",
            where=where,
            line=line,
            fix="raise --max_length, or pass --overlong truncate (cut responses) or drop (skip rows).",
        )
    if not encoded:
        raise UserError("no rows left after dropping over-long rows", where=where, fix="raise --max_length.")
    return encoded, stats
