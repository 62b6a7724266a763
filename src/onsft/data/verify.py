"""Answer checking: is a model's response correct against a gold answer?

    verifier = get_verifier("math")            # or "exact", "my_module:check", "checks/grade.py:check"
    verifier(response, answer) -> bool
    verifier.check(response, answer) -> Verdict  # how it was decided, the extracted answer, a score

Verifiers
- "math": math-verify (gold parsed first, prediction second, as its API requires). The prediction is
  the last \\boxed{...} of the response; a response without one is handed to math-verify whole, whose
  own extraction looks for a final answer. The gold answer is wrapped in \\boxed{} so LaTeX and plain
  forms both parse. Decided equal by math-verify: \\boxed{1/2} = 0.5 = \\frac12 = \\frac{1}{2} = 50\\%
  (a percent reads as /100), 10 = 10.0, x+1 = 1+x, {1,2} = {2,1}. Not equal: bcda vs BCDA.
  Falls back to the normalised string comparison of "exact" (and says so in `Verdict.method`) when
  math-verify cannot parse either side, when it errors or times out, when an answer is longer than
  `max_answer_chars`, and for gold answers that are bare words of two or more letters (`bcda`,
  `yes`, `a1B2`): math-verify reads those as products of symbols, so `abc` would equal `cba`.
- "exact": the final answer extracted by `extract_final_answer` (the whole response when it has no
  answer marker) equals the gold answer after `normalize_answer` (case-sensitive: `aBc` != `abc`; plain
  decimal numbers are compared as numbers: `30.0` equals `30`).
- Both read a gold answer stored boxed (`\\boxed{30}`, or a solution ending in one) as its boxed content.
- "module:function" or "path/to/file.py:function": a user function fn(response, answer) returning a
  bool, or a float score in [0, 1] that counts as correct at >= 0.5.

Robustness of math-verify: sympy can take minutes (or forever) on adversarial strings such as
\\boxed{(10^7)!}. math-verify bounds each parse and comparison with SIGALRM, which only works in the
main thread; in any other thread (a data loader, a server) math_verify_runner.py runs it in a child
process instead and kills it when it overruns. Either way an overrun becomes a string comparison and
is counted (`Verifier.stats`), never a crash or a hang.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

from onsft.data.math_verify_runner import BoundedMathVerify
from onsft.errors import UserError

BUILTIN = ("math", "exact")
ANSWER_MARKERS = ("\\boxed{", "\\fbox{")


@dataclass
class Verdict:
    """One decision. `method` says how it was made: math-verify, exact, custom, or a *-fallback."""

    correct: bool
    method: str
    extracted: str | None
    score: float | None = None


# ---------------------------------------------------------------------------------- answer extraction


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}) with balanced braces; None when there is none
    or it never closes (a truncated response has no final answer)."""
    start, marker = max((text.rfind(m), m) for m in ANSWER_MARKERS)
    if start < 0:
        return None
    depth, begin = 1, start + len(marker)
    for j in range(begin, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[begin:j]
    return None


_FINAL_PATTERNS = (
    re.compile(r"####\s*(.+?)\s*$", re.MULTILINE),  # GSM8K
    re.compile(r"(?:final answer|the answer is|answer:)\s*[:=]?\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE),
)


def extract_final_answer(text: str) -> str | None:
    """The response's final answer: the last \\boxed{...}; else the last `#### X` line (GSM8K);
    else the rest of the last line saying "final answer", "the answer is" or "answer:"; else None."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    for pattern in _FINAL_PATTERNS:
        found = pattern.findall(text)
        if found:
            return found[-1]
    return None


_WRAPPERS = re.compile(r"^\\(?:text|textbf|mathrm|mathbf|mbox)\{(.*)\}$", re.DOTALL)
_DECIMAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)")


def normalize_answer(answer: str) -> str:
    """Whitespace collapsed, and outer decoration removed: $...$, \\text{...} (and similar), a trailing
    full stop. Case is kept."""
    text = " ".join(answer.split())
    while True:
        before = text
        if len(text) >= 2 and text.startswith("$") and text.endswith("$"):
            text = text.strip("$").strip()
        match = _WRAPPERS.match(text)
        if match:
            text = match.group(1).strip()
        if text.endswith("."):
            text = text[:-1].rstrip()
        if text == before:
            return text


def gold_answer(answer) -> str:
    """The gold answer to compare with: normalised, and the content of its last \\boxed{...} when it holds
    one (datasets often store the answer boxed, `\\boxed{30}`, or a whole solution ending in one)."""
    text = normalize_answer(str(answer))
    boxed = last_boxed(text)
    return normalize_answer(boxed) if boxed is not None else text


def same_answer(extracted: str, gold: str) -> bool:
    """Normalised answers equal as text, or as numbers when both are plain decimals (`30.0` equals `30`)."""
    a, b = normalize_answer(extracted), normalize_answer(gold)
    return a == b or bool(_DECIMAL.fullmatch(a) and _DECIMAL.fullmatch(b) and Decimal(a) == Decimal(b))


def _is_word(answer: str) -> bool:
    """A bare alphanumeric word with two or more letters: a string answer, not a product of symbols."""
    return bool(re.fullmatch(r"[A-Za-z0-9]+", answer)) and sum(c.isalpha() for c in answer) >= 2


# ------------------------------------------------------------------------------------------ verifiers


class Verifier:
    """A callable (response, answer) -> bool with a `check` that explains itself and running counts."""

    name = "verifier"

    def __init__(self):
        self.stats: Counter[str] = Counter()

    def check(self, response: str, answer: str) -> Verdict:
        verdict = self._check(response, answer)
        self.stats[verdict.method] += 1
        return verdict

    def __call__(self, response: str, answer: str) -> bool:
        return self.check(response, answer).correct

    def _check(self, response: str, answer: str) -> Verdict:
        raise NotImplementedError


class ExactVerifier(Verifier):
    name = "exact"

    def _check(self, response: str, answer: str) -> Verdict:
        extracted = extract_final_answer(response)
        if extracted is None:
            # No answer marker: the whole response is the answer (short-answer tasks).
            extracted = response
        gold = gold_answer(answer)
        return Verdict(bool(gold) and same_answer(extracted, gold), "exact", extracted)


class MathVerifier(Verifier):
    name = "math"

    def __init__(self, timeout_seconds: int = 5, max_answer_chars: int = 1000):
        super().__init__()
        self.timeout_seconds = max(1, int(timeout_seconds))
        self.max_answer_chars = max_answer_chars
        self._runner = BoundedMathVerify()

    def _check(self, response: str, answer: str) -> Verdict:
        boxed = last_boxed(response)
        extracted = boxed if boxed is not None else extract_final_answer(response)
        gold = gold_answer(answer)
        if not gold:
            return Verdict(False, "no-gold", extracted)
        if _is_word(gold):
            return self._string(extracted, gold, "word-fallback")
        if boxed is not None:
            prediction = "\\boxed{" + boxed + "}"
        else:
            # Let math-verify's own extraction find a final answer near the end of the text.
            prediction = response[-4 * self.max_answer_chars :]
        if len(gold) > self.max_answer_chars or (boxed is not None and len(boxed) > self.max_answer_chars):
            return self._string(extracted, gold, "long-fallback")
        equal, method = self._math_verify("\\boxed{" + gold + "}", prediction)
        if equal is None:
            return self._string(extracted, gold, method)
        return Verdict(equal, method, extracted)

    def _math_verify(self, gold: str, prediction: str) -> tuple[bool | None, str]:
        return self._runner(gold, prediction, self.timeout_seconds)

    @staticmethod
    def _string(extracted: str | None, gold: str, method: str) -> Verdict:
        if extracted is None:
            return Verdict(False, "no-answer", None)
        return Verdict(same_answer(extracted, gold), method, extracted)

    def close(self) -> None:
        self._runner.close()


def call_user_function(function: Callable, args: tuple, what: str, returns: str):
    """Call a user's function (a verifier, a step checker); whatever it raises becomes one line naming it."""
    try:
        return function(*args)
    except Exception as error:
        raise UserError(
            f"{what} raised {type(error).__name__}: {error}",
            where=what.split("`")[1] if "`" in what else what,
            fix=f"make the function return {returns}.",
        ) from None


class CallableVerifier(Verifier):
    def __init__(self, function: Callable, name: str, threshold: float = 0.5):
        super().__init__()
        self.function, self.name, self.threshold = function, name, threshold

    def _check(self, response: str, answer: str) -> Verdict:
        result = call_user_function(
            self.function,
            (response, answer),
            f"verifier `{self.name}`",
            "a bool or a float for every (response, answer)",
        )
        if isinstance(result, bool) or result is None:
            return Verdict(bool(result), "custom", None, float(bool(result)))
        try:
            score = float(result)
        except (TypeError, ValueError):
            raise UserError(
                f"verifier `{self.name}` returned {type(result).__name__}, not a bool or float",
                where=self.name,
                fix="return True/False or a score in [0, 1].",
            ) from None
        return Verdict(score >= self.threshold, "custom", None, score)


def load_function(
    spec: str,
    flag: str = "--verifier",
    builtin: tuple[str, ...] = BUILTIN,
    signature: str = "fn(response, answer) -> bool | float",
) -> Callable:
    """The function a "module:function" or "path/file.py:function" spec names (user verifiers, step checkers);
    every way it can fail is a UserError naming `flag`."""
    what = flag.lstrip("-").replace("_", " ")
    target, _, function_name = spec.rpartition(":")
    if not target or not function_name.isidentifier():
        raise UserError(
            f"{what} `{spec}` is not `module:function` or `file.py:function`",
            where=flag,
            fix=f"use one of {', '.join(builtin)}, `package.module:function` or `path/to/file.py:function`.",
        )
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target)
        if not path.is_file():
            raise UserError(f"{what} file not found", where=str(path), fix="check the path before `:function`.")
        module_name = f"onsft_user_{what.replace(' ', '_')}_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            sys.modules[module_name] = module
            module_spec.loader.exec_module(module)
        except Exception as error:
            sys.modules.pop(module_name, None)
            raise UserError(
                f"cannot import the {what} file ({type(error).__name__}: {error})",
                where=str(path),
                fix="fix the file so that it imports cleanly.",
            ) from None
    else:
        try:
            module = importlib.import_module(target)
        except Exception as error:
            raise UserError(
                f"cannot import module `{target}` ({type(error).__name__}: {error})",
                where=flag,
                fix="check the module name and that it is importable (on PYTHONPATH).",
            ) from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise UserError(
            f"`{function_name}` is not a function in `{target}`",
            where=flag,
            fix=f"name a function {signature} defined there.",
        )
    return function


def get_verifier(spec: str | Callable | Verifier, timeout_seconds: int = 5) -> Verifier:
    """A `Verifier` from "math", "exact", "module:function", "path/file.py:function" or a callable."""
    if isinstance(spec, Verifier):
        return spec
    if callable(spec):
        return CallableVerifier(spec, getattr(spec, "__name__", "callable"))
    name = spec.strip() if isinstance(spec, str) else ""
    if name == "math":
        return MathVerifier(timeout_seconds=timeout_seconds)
    if name == "exact":
        return ExactVerifier()
    if ":" not in name:
        raise UserError(
            f"unknown verifier `{name}`" if name else f"unknown verifier {spec!r}",
            where="--verifier",
            fix=f"use one of {', '.join(BUILTIN)}, `module:function` or `file.py:function`.",
        )
    return CallableVerifier(load_function(name), name)


@dataclass
class VerifyConfig:
    """How responses are checked against the gold `answer`."""

    verifier: str = field(
        default="math",
        metadata={
            "help": "math (math-verify) | exact | module:function | path/file.py:function (response, answer) "
            "-> bool or score."
        },
    )
    verify_timeout: int = field(default=5, metadata={"help": "Seconds math-verify may spend per parse / comparison."})

    def validate(self) -> None:
        if self.verify_timeout < 1:
            raise UserError(
                "`verify_timeout` must be at least 1 second", where="command line", fix="pass --verify_timeout 5."
            )

    def build(self) -> Verifier:
        self.validate()
        return get_verifier(self.verifier, timeout_seconds=self.verify_timeout)
