"""Worked solutions built for reasoning-gym tasks that ship only a gold answer.

A task without a worked solution can be evaluated but not trained on (SFT needs a response) nor rewritten
(hinted decoding needs a reference). These builders write a short, correct, teacher-style solution from an
item's metadata, in the layout of `chain_sum`'s running sums: one stated step per line, then "The final
answer is \\boxed{X}." Each returns None when the item is not of the expected shape or its steps do not reach
the gold answer, so a row never carries a reference that contradicts its `answer`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

_TERM = re.compile(r"([+-])\s*(\d+)")


def final_line(answer: str, answer_format: str) -> str:
    final = f"\\boxed{{{answer}}}" if answer_format == "boxed" else str(answer)
    return f"The final answer is {final}."


def chain_sum_reference(expression: str, answer: str, answer_format: str = "boxed") -> str | None:
    """A running sum, one step per line: `12 + 7 = 19`, `19 - 4 = 15`, ... (None when the expression
    is not a plain chain of + and -, e.g. with negated terms)."""
    text = expression.strip()
    first = re.match(r"(\d+)", text)
    if not first:
        return None
    rest = text[first.end() :]
    terms = _TERM.findall(rest)
    if "".join(f"{s}{d}" for s, d in terms) != rest.replace(" ", ""):
        return None
    total, lines = int(first.group(1)), []
    for sign, digits in terms:
        new = total + int(digits) if sign == "+" else total - int(digits)
        lines.append(f"{total} {sign} {digits} = {new}")
        total = new
    if str(total) != str(answer).strip():
        return None
    return "\n".join(lines + [final_line(answer, answer_format)])


def gcd_reference(numbers: list[int], answer: str, answer_format: str = "boxed") -> str | None:
    """The Euclidean algorithm, one division per line (`98 = 1 * 58 + 40`), for two positive numbers."""
    if len(numbers) != 2 or not all(isinstance(n, int) and n > 0 for n in numbers):
        return None
    a, b = max(numbers), min(numbers)
    lines = []
    while b:
        lines.append(f"{a} = {a // b} * {b} + {a % b}")
        a, b = b, a % b
    if str(a) != str(answer).strip():
        return None
    lines.append(f"The remainder is 0, so the GCD is {a}.")
    return "\n".join(lines + [final_line(answer, answer_format)])


def leg_counting_reference(
    animals: Mapping[str, int], legs: Mapping[str, int], answer: str, answer_format: str = "boxed"
) -> str | None:
    """Legs per kind of animal (`3 spiders have 3 * 8 = 24 legs`), then their sum."""
    if not animals or any(name not in legs for name in animals):
        return None
    lines, parts = [], []
    for name, count in animals.items():
        total = count * legs[name]
        noun = name if count == 1 else _plural(name)
        lines.append(f"{count} {noun} {'has' if count == 1 else 'have'} {count} * {legs[name]} = {total} legs.")
        parts.append(total)
    if str(sum(parts)) != str(answer).strip():
        return None
    if len(parts) > 1:
        lines.append(f"In total: {' + '.join(map(str, parts))} = {sum(parts)} legs.")
    return "\n".join(lines + [final_line(answer, answer_format)])


def _plural(name: str) -> str:
    return name + "es" if name.endswith(("s", "sh", "ch", "x")) else name + "s"


def _leg_table() -> dict[str, int]:
    from reasoning_gym.arithmetic.leg_counting import ANIMALS

    return dict(ANIMALS)


# task -> (metadata, answer, answer_format) -> reference or None
BUILDERS: dict[str, Callable[[Mapping[str, Any], str, str], str | None]] = {
    "chain_sum": lambda m, a, f: (
        chain_sum_reference(m["expression"], a, f) if isinstance(m.get("expression"), str) else None
    ),
    "gcd": lambda m, a, f: gcd_reference(list(m.get("numbers") or []), a, f),
    "leg_counting": lambda m, a, f: (
        leg_counting_reference(m["animals"], _leg_table(), a, f) if isinstance(m.get("animals"), dict) else None
    ),
}
