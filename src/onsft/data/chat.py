"""Tokenising rows with the model's chat template: prompt ids, response ids, and the over-long policy.

A response is what the model must emit after the prompt (end-of-turn tokens included), so training
masks the prompt with -100 and scoring reads the response positions only.

Two checks run before any text reaches the tokenizer or after it, so that a bad row costs a line, not a
run: a row whose text cannot fit in the token budget is refused by its character count alone (a 50 MB
line would otherwise take gigabytes and minutes to tokenise only to be rejected), and a row the tokenizer
maps to nothing but unknown tokens is counted (an error when every row is like that). A chat template that
rejects a row (a role it does not support, turns that do not alternate) is an error naming the row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from onsft.data.rows import Example, Messages
from onsft.errors import UserError, warn

OVERLONG = ("reject", "truncate", "drop")
OVERLONG_HELP = (
    "Rows longer than max_length: `reject` (stop with a count, the default), `truncate` (cut the response's tail, "
    "never the prompt), or `drop` (skip them, with a count)."
)


def overlong_field() -> Any:
    """`overlong`, declared once for every command that encodes training rows under --max_length."""
    return field(default="reject", metadata={"help": OVERLONG_HELP})


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


def _render(tokenizer, messages: Messages, where: str, line: int | None, **options) -> list[int]:
    """The template's token ids; a template that raises (jinja's `raise_exception`, or a row it trips on) is
    a one-line error naming the row and what to change, not a jinja traceback."""
    try:
        return _ids(tokenizer.apply_chat_template(messages, tokenize=True, **options))
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - any error inside a template is about the row or the template
        text = " ".join(str(error).split()) or type(error).__name__
        roles = ", ".join(m["role"] for m in messages)
        if "system" in text.lower():
            fix = (
                "this template has no system role: merge the system text into the first user turn (for "
                "rewrite's hinted context, pass --hint_system '')"
            )
        elif "alternate" in text.lower():
            fix = "give the turns in the order the template requires (user and assistant alternating)"
        else:
            fix = "change the row's turns so that the template accepts them, or use a model whose template does"
        raise UserError(
            f"the model's chat template rejects this row (turns: {roles}): {text}",
            where=where,
            line=line,
            fix=fix + ".",
        ) from None


def encode_prompt(tokenizer, prompt: Messages, where: str = "model", line: int | None = None) -> list[int]:
    """Token ids of the chat prompt ending with the assistant header: what the model sees at test time."""
    _check_chat_template(tokenizer, where)
    return _render(tokenizer, prompt, where, line, add_generation_prompt=True)


def encode_response(
    tokenizer,
    prompt: Messages,
    response: str,
    prompt_ids: list[int] | None = None,
    where: str = "model",
    line: int | None = None,
) -> list[int]:
    """Token ids the model must emit after the prompt, end-of-turn tokens included.

    Where the template renders the full chat with the prompt as a prefix (most templates), the response is
    the rest of the rendered chat, so end-of-turn markers are learned exactly as the template writes them.
    Otherwise (templates that rewrite earlier turns) it falls back to the text plus EOS.
    """
    prompt_ids = prompt_ids if prompt_ids is not None else encode_prompt(tokenizer, prompt, where, line)
    full = _render(tokenizer, prompt + [{"role": "assistant", "content": response}], where, line)
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


def longest_token(tokenizer) -> int:
    """Characters of the longest entry in the tokenizer's vocabulary: no token covers more text (a byte-level
    token's string has one character per byte, and a byte-fallback token like <0x0A> more than its byte)."""
    cached = getattr(tokenizer, "_onsft_longest_token", None)
    if cached is None:
        cached = max((len(token) for token in tokenizer.get_vocab()), default=1) or 1
        tokenizer._onsft_longest_token = cached
    return cached


def char_budget(tokenizer, tokens: int) -> int:
    """Characters beyond which a text cannot fit in `tokens` tokens, with a 4x margin for normalisers that
    drop characters: such a row is refused from its length alone, before tokenising it."""
    return 4 * tokens * longest_token(tokenizer)


def text_chars(messages: Messages, *texts: str | None) -> int:
    return sum(len(m["content"]) for m in messages) + sum(len(t) for t in texts if t)


def check_text_budget(
    tokenizer, examples: Sequence[Example], tokens: int | None, where: str, with_reference: bool = False
) -> None:
    """Refuse rows whose prompt (and `reference`, which a hinted prompt holds) cannot fit in `tokens` tokens,
    by their character count, before anything tokenises them."""
    if not tokens:
        return
    budget = char_budget(tokenizer, tokens)
    over = [e for e in examples if text_chars(e.prompt, e.reference if with_reference else None) > budget]
    if over:
        first = text_chars(over[0].prompt, over[0].reference if with_reference else None)
        raise UserError(
            f"{len(over)} row(s) have more than {budget:,} characters of prompt"
            + (" and reference" if with_reference else "")
            + f", which cannot fit in the {tokens} tokens allowed (first: {first:,} characters)",
            where=where,
            line=over[0].line,
            fix="shorten or remove those rows.",
        )


def unknown_only(tokenizer, texts: Sequence[str]) -> list[bool]:
    """Per text: does the tokenizer map it to nothing but its unknown token (or to nothing at all, as a
    vocabulary without an unknown token does with characters it lacks)?"""
    if not texts:
        return []
    unknown = tokenizer.unk_token_id
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [all(i == unknown for i in row) for row in ids]


def check_known_text(tokenizer, texts: Sequence[str], lines: Sequence[int | None], where: str, what: str) -> int:
    """Count the texts made of nothing but unknown tokens: an error when all are, a warning with the count
    when some are (the model would learn, or be scored on, nothing). Returns the count."""
    flags = unknown_only(tokenizer, texts)
    bad = [line for line, flag in zip(lines, flags) if flag]
    if bad and len(bad) == len(flags):
        raise UserError(
            f"every {what} ({len(bad)}) maps to nothing but unknown tokens of the model's tokenizer",
            where=where,
            line=bad[0],
            fix="use a model whose vocabulary covers this text (another language or script?), or check the "
            "file's encoding.",
        )
    if bad:
        warn(
            f"{len(bad)} of {len(flags)} {what}s map to nothing but unknown tokens of the model's tokenizer "
            f"(first on line {bad[0]}); they carry no signal",
            where=where,
        )
    return len(bad)


def encode_examples(
    tokenizer, examples: Sequence[Example], max_length: int, overlong: str = "reject", where: str = "data"
) -> tuple[list[Encoded], dict[str, int]]:
    """Encode all rows. Under `reject`, every over-long row is counted before stopping, so one run says how many.
    Rows far past max_length by their character count alone are never tokenised: rejected or dropped as the
    policy says, or (truncate) their response cut to the character budget first."""
    if overlong not in ("reject", "truncate", "drop"):
        raise UserError(
            f"unknown --overlong value `{overlong}`", where="command line", fix="use reject, truncate or drop."
        )
    encoded, stats = [], {"rows": len(examples), "dropped": 0, "truncated": 0}
    too_long: list[tuple[int, str]] = []
    budget = char_budget(tokenizer, max_length)
    responses: dict[int, str] = {}  # the response text each kept row was encoded from (cut under truncate)
    for example in examples:
        response = example.response or ""
        if text_chars(example.prompt, response) > budget:
            if overlong == "reject":
                too_long.append((example.line, f"{text_chars(example.prompt, response):,} characters"))
                continue
            if overlong == "drop":
                stats["dropped"] += 1
                continue
            if text_chars(example.prompt) > budget:
                raise UserError(
                    f"prompt alone has {text_chars(example.prompt):,} characters, so the whole response is past "
                    f"max_length={max_length}",
                    where=where,
                    line=example.line,
                    fix="raise --max_length, shorten the prompt, or use --overlong drop.",
                )
            response = response[: budget - text_chars(example.prompt)]  # truncated to tokens below anyway
        responses[example.index] = response
        prompt_ids = encode_prompt(tokenizer, example.prompt, where, example.line)
        response_ids = encode_response(tokenizer, example.prompt, response, prompt_ids, where, example.line)
        total = len(prompt_ids) + len(response_ids)
        if overlong == "reject" and total > max_length:
            too_long.append((example.line, f"{total} tokens"))
            continue
        item = _fit(prompt_ids, response_ids, example, max_length, overlong, where)
        if item is None:
            stats["dropped"] += 1
            continue
        stats["truncated"] += int(item.truncated)
        encoded.append(item)
    if too_long:
        line, size = too_long[0]
        raise UserError(
            f"{len(too_long)} of {len(examples)} rows are longer than max_length={max_length} (first: {size})",
            where=where,
            line=line,
            fix="raise --max_length, or pass --overlong truncate (cut responses) or drop (skip rows).",
        )
    if not encoded:
        raise UserError("no rows left after dropping over-long rows", where=where, fix="raise --max_length.")
    stats["unknown_only"] = check_known_text(
        tokenizer, [responses[e.index] for e in encoded], [e.line for e in encoded], where, "response"
    )
    return encoded, stats
