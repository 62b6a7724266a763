"""Step checks: do the intermediate steps a response states hold? A final-answer check cannot see a false step
when the answer was copied from a reference ("£2340 + £195 = £28080" followed by the right total).

    checker = get_step_checker("arithmetic")     # or "module:function", "path/to/file.py:function"
    checker(text) -> StepReport(checked=3, false=["2340 + 195 = 28080 (computes to 2535)"])

Checkers
- "arithmetic" (`check_arithmetic`): every stated equation between numbers is evaluated: `a op b = c` and
  chains `a op b op c = d` with op one of + - * / x × ÷ · (and LaTeX \\times \\cdot \\div), * and / before
  + and -, left to right, in exact rational arithmetic. Numbers may carry a currency symbol (£ $ € \\$),
  thousands separators (1,234.5) and decimals; a leading minus is a sign. The stated result holds when it
  equals the value within a relative 1e-6, or when it is the value rounded to the stated precision
  (3.33 for 10 / 3, 60 for 19.99 * 3). Checked are adjacent sides of `=` of which exactly one is a single
  number (the stated result) and the other holds an operator, so running chains ("2 + 3 = 5 * 2 = 10") are
  read step by step. Not checked (never flagged): anything that could be part of a larger expression or
  is not plain arithmetic: variables and units glued to numbers (2x, 5kg), powers, roots, factorials,
  brackets inside the equation, fractions written \\frac{..}{..}, percentages, decimal commas (3,5),
  division by zero.
- "module:function" or "path/to/file.py:function": a user function fn(text) returning the false steps it
  found (a list of strings; empty: none) or a bool (True: every step holds).

All functions here are pure (text in, report out); `StepCheckConfig` carries the `--step_check` flags.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Literal

from onsft.data.verify import call_user_function, load_function
from onsft.errors import UserError

MODES = ("flag", "drop", "off")
RELATIVE_TOLERANCE = Fraction(1, 10**6)


@dataclass
class StepReport:
    """What a step check found in one text: how many steps it could check, and the false ones as written."""

    checked: int
    false: list[str]


# ------------------------------------------------------------------------------------------- numbers

_NUMBER = re.compile(
    r"(?<![\w.,^√):])"  # not glued to a word, a decimal point, a power, a root, a bracket or a clock time
    r"(?:[£$€]\s?)?"
    r"(?P<digits>\d{1,3}(?:,\d{3})+|\d+)(?P<decimals>\.\d+)?(?P<percent>%)?"
    r"(?![\w(²³^!]|[.,:]\d)"  # not followed by a unit, a variable, a product with a bracket, a power, more digits
)


def parse_number(text: str) -> tuple[Fraction, int] | None:
    """(exact value, decimal places) of one number as written ("£1,234.50" -> (1234.5, 2)); None when `text`
    is not one plain number (or is a percentage)."""
    text = text.strip()
    sign = -1 if text[:1] in "-−" else 1
    match = _NUMBER.fullmatch(text.lstrip("-−").strip())
    if match is None or match.group("percent"):
        return None
    decimals = match.group("decimals") or ""
    value = Fraction(match.group("digits").replace(",", "") + decimals)
    return sign * value, max(len(decimals) - 1, 0)


def holds(value: Fraction, stated: Fraction, places: int) -> bool:
    """The stated result is right: equal within a relative 1e-6, or `value` rounded to `places` decimals."""
    gap = abs(value - stated)
    return gap <= RELATIVE_TOLERANCE * max(abs(value), abs(stated)) or gap <= Fraction(1, 2 * 10**places)


# ------------------------------------------------------------------------------------------ tokens

# LaTeX that wraps or spaces numbers without changing them.
_WRAPPER = re.compile(r"\\(?:boxed|text|textbf|mathrm|mathbf|mbox)\{([^{}]*)\}")
_LATEX_THOUSANDS = re.compile(r"(?<=\d)\\,(?=\d{3}(?!\d))")
_LATEX_SPACE = re.compile(r"\\[,;:! ]|\\left|\\right|\\[()\[\]]|\*\*")
_MATH_DOLLAR = re.compile(r"\$(?!\s?\d)")  # a $ not before a number delimits math; before one it is currency
_TOKEN = re.compile(
    rf"(?P<number>{_NUMBER.pattern})"
    r"|(?P<op>\\times|\\cdot|\\div|[+\-*/×÷·−]|(?<=\s)[xX](?=\s))"
    r"|(?P<eq>(?<![=<>!≤≥:])=(?![=>]))"
    r"|(?P<space>[ \t]+)"
    r"|(?P<other>\S)"
)
_OPS = {"\\times": "*", "\\cdot": "*", "×": "*", "·": "*", "x": "*", "X": "*", "\\div": "/", "÷": "/", "−": "-"}


@dataclass
class _Token:
    kind: str  # number, op, eq, other
    text: str
    start: int
    end: int
    spaced: bool  # whitespace right before it


def _normalize(text: str) -> str:
    while True:
        unwrapped = _WRAPPER.sub(r" \1 ", text)
        if unwrapped == text:
            break
        text = unwrapped
    text = _LATEX_THOUSANDS.sub(",", text.replace("\\$", "$"))
    return _MATH_DOLLAR.sub(" ", _LATEX_SPACE.sub(" ", text))


def _tokens(line: str) -> list[_Token]:
    tokens, spaced = [], True
    for match in _TOKEN.finditer(line):
        kind = match.lastgroup
        if kind == "space":
            spaced = True
            continue
        if kind == "number" and match.group("percent"):
            kind = "percent"
        text = _OPS.get(match.group(), match.group()) if kind == "op" else match.group()
        tokens.append(_Token(kind, text, match.start(), match.end(), spaced))
        spaced = False
    return tokens


# ------------------------------------------------------------------------------------------ equations


def _operands(segment: list[_Token]) -> tuple[list[Fraction], list[str]] | None:
    """Numbers and operators of `[-]n (op [-]n)*`, or None when the segment is not that."""
    values, ops, i = [], [], 0
    while True:
        sign = 1
        if i < len(segment) and segment[i].kind == "op" and segment[i].text == "-":
            sign, i = -1, i + 1
        if i >= len(segment) or segment[i].kind != "number":
            return None
        values.append(sign * parse_number(segment[i].text)[0])
        i += 1
        if i == len(segment):
            return values, ops
        if segment[i].kind != "op":
            return None
        ops.append(segment[i].text)
        i += 1


def evaluate(values: list[Fraction], ops: list[str]) -> Fraction | None:
    """The value of values[0] ops[0] values[1] ..., * and / first, left to right; None on division by zero."""
    terms, signs = [values[0]], []
    for op, value in zip(ops, values[1:]):
        if op in "*/":
            if op == "/" and value == 0:
                return None
            terms[-1] = terms[-1] * value if op == "*" else terms[-1] / value
        else:
            terms.append(value)
            signs.append(1 if op == "+" else -1)
    return terms[0] + sum(sign * term for sign, term in zip(signs, terms[1:]))


def _closed_start(line: str, run: list[_Token], before: _Token | None) -> bool:
    """The run's first side stands alone: nothing that binds tighter (a power, a closing bracket, a
    variable before a minus sign) comes right before it."""
    if before is not None and not run[0].spaced and before.text in ")]}^√!_|":
        return False
    if run[0].kind == "op":  # only a sign may open a side; after a word or a number it is a subtraction
        previous = line[: run[0].start].rstrip()[-1:]
        return run[0].text == "-" and (not previous or not (previous.isalnum() or previous in ")]}"))
    return True


def _closed_end(run: list[_Token], after: _Token | None) -> bool:
    """The run's last side stands alone: no bracket, power or root follows glued to it."""
    return after is None or after.spaced or after.text not in "([{^√_|"


def find_equations(text: str) -> list[tuple[str, Fraction, Fraction, int]]:
    """Every checkable stated equation: (as written, value of the expression side, stated result, its decimal
    places), in order of appearance. See the module docstring for what is read and what is left alone."""
    found = []
    for line in _normalize(text).splitlines():
        tokens = _tokens(line)
        i = 0
        while i < len(tokens):
            if tokens[i].kind not in ("number", "op", "eq"):
                i += 1
                continue
            j = i
            while j < len(tokens) and tokens[j].kind in ("number", "op", "eq"):
                j += 1
            run, before, after = tokens[i:j], tokens[i - 1] if i else None, tokens[j] if j < len(tokens) else None
            found += _run_equations(line, run, before, after, j < len(tokens) and tokens[j].kind == "percent")
            i = j
    return found


def _run_equations(line: str, run: list[_Token], before, after, percent_follows: bool):
    if percent_follows or not any(t.kind == "eq" for t in run):
        return []
    sides, current = [], []
    for token in run:
        if token.kind == "eq":
            sides.append(current)
            current = []
        else:
            current.append(token)
    sides.append(current)
    parsed = [_operands(side) if side else None for side in sides]
    if not _closed_start(line, run, before):
        parsed[0] = None
    if not _closed_end(run, after):
        parsed[-1] = None
    found = []
    for k in range(len(sides) - 1):
        left, right = parsed[k], parsed[k + 1]
        if left is None or right is None or (len(left[1]) == 0) == (len(right[1]) == 0):
            continue  # a side that is not plain arithmetic, two single numbers, or two expressions
        expression, stated_side = (left, sides[k + 1]) if left[1] else (right, sides[k])
        value = evaluate(*expression)
        if value is None:
            continue
        stated, places = parse_number("".join(t.text for t in stated_side))
        written = " ".join(line[sides[k][0].start : sides[k + 1][-1].end].split())
        found.append((written, value, stated, places))
    return found


def _show(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{float(value):.10g}"


def check_arithmetic(text: str) -> StepReport:
    """The "arithmetic" step check: the stated equations between numbers that do not hold."""
    equations = find_equations(text)
    false = [
        f"{written} (computes to {_show(value)})"
        for written, value, stated, places in equations
        if not holds(value, stated, places)
    ]
    return StepReport(len(equations), false)


STEP_CHECKERS: dict[str, Callable[[str], StepReport]] = {"arithmetic": check_arithmetic}


# ------------------------------------------------------------------------------------------- checkers


class StepChecker:
    """A named step check: text -> StepReport (a user function's list or bool is turned into one)."""

    def __init__(self, function: Callable, name: str):
        self.function, self.name = function, name

    def __call__(self, text: str) -> StepReport:
        result = call_user_function(
            self.function, (text,), f"step checker `{self.name}`", "a list of false steps (or a bool) for every text"
        )
        if isinstance(result, StepReport):
            return result
        if isinstance(result, bool):
            return StepReport(1, [] if result else ["a step the checker found false"])
        if isinstance(result, (list, tuple)) and all(isinstance(step, str) for step in result):
            return StepReport(len(result), list(result))  # a user's checker reports only its findings
        raise UserError(
            f"step checker `{self.name}` returned {type(result).__name__}, not a list of strings or a bool",
            where=self.name,
            fix="return the false steps found as a list of strings (empty: none), or True/False.",
        )


def get_step_checker(spec: str | Callable) -> StepChecker:
    """A `StepChecker` from a built-in name ("arithmetic"), "module:function", "file.py:function" or a callable."""
    if callable(spec):
        return StepChecker(spec, getattr(spec, "__name__", "callable"))
    spec = str(spec).strip()
    if spec in STEP_CHECKERS:
        return StepChecker(STEP_CHECKERS[spec], spec)
    if ":" not in spec:
        raise UserError(
            f"unknown step checker `{spec}`",
            where="--step_checker",
            fix=f"use one of {', '.join(STEP_CHECKERS)}, `module:function` or `file.py:function`.",
        )
    function = load_function(spec, "--step_checker", tuple(STEP_CHECKERS), "fn(text) -> list of false steps | bool")
    return StepChecker(function, spec)


@dataclass
class StepCheckConfig:
    """The step check of kept responses (`onsft rewrite`)."""

    step_check: Literal["flag", "drop", "off"] = field(
        default="flag",
        metadata={
            "help": "Check the steps a kept response states (e.g. every `a + b = c`): flag rows with a false "
            "one (false_steps in the records, counted in the summary), drop them (another verified candidate "
            "is taken when there is one), or off."
        },
    )
    step_checker: str = field(
        default="arithmetic",
        metadata={
            "help": "arithmetic (stated equations between numbers) | module:function | path/file.py:function "
            "(text) -> the false steps found (list of strings) or a bool."
        },
    )

    def validate(self) -> None:
        if self.step_check not in MODES:
            raise UserError(
                f"unknown step_check `{self.step_check}`", where="config", fix=f"use one of {', '.join(MODES)}."
            )
        if not str(self.step_checker).strip():
            raise UserError("`step_checker` is empty", where="config", fix="pass --step_checker arithmetic.")

    def build_step_checker(self) -> StepChecker | None:
        """The checker (None when off); a user function is imported here, before any work."""
        self.validate()
        return None if self.step_check == "off" else get_step_checker(self.step_checker)
