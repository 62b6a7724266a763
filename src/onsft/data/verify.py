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
- "module:function" or "path/to/file.py:function": a user function fn(response, answer) returning a
  bool, or a float score in [0, 1] that counts as correct at >= 0.5.

Robustness of math-verify: sympy can take minutes (or forever) on adversarial strings such as
\\boxed{(10^7)!}. math-verify bounds each parse and comparison with SIGALRM, which only works in the
main thread; in any other thread (a data loader, a server) this module runs math-verify in a child
process instead and kills it when it overruns. Either way an overrun becomes a string comparison and
is counted (`Verifier.stats`), never a crash or a hang.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import select
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

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


def same_answer(extracted: str, gold: str) -> bool:
    """Normalised answers equal as text, or as numbers when both are plain decimals (`30.0` equals `30`)."""
    a, b = normalize_answer(extracted), normalize_answer(gold)
    return a == b or bool(_DECIMAL.fullmatch(a) and _DECIMAL.fullmatch(b) and Decimal(a) == Decimal(b))


def _is_word(answer: str) -> bool:
    """A bare alphanumeric word with two or more letters: a string answer, not a product of symbols."""
    return bool(re.fullmatch(r"[A-Za-z0-9]+", answer)) and sum(c.isalpha() for c in answer) >= 2


# ---------------------------------------------------------------------------------------- math-verify


_WARM = False


def _warm_up_math_verify(parse, verify) -> None:
    """One untimed parse and comparison per process: the first call imports sympy's LaTeX and
    expression machinery lazily, which on a loaded machine can take longer than a per-answer time limit
    meant for pathological inputs (then a correct "1/2" vs "0.5" would be judged by string comparison)."""
    global _WARM
    if not _WARM:
        _WARM = True
        verify(parse("$\\frac{1}{2}$", parsing_timeout=120), parse("$0.5$", parsing_timeout=120), timeout_seconds=120)


def _math_verify_in_process(gold: str, prediction: str, timeout: int) -> tuple[bool | None, str]:
    """(equal, method); equal is None when math-verify could not decide (then the caller falls back).
    Needs the main thread: math-verify's time limits are SIGALRM-based."""
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    _warm_up_math_verify(parse, verify)
    try:
        gold_parsed = parse(gold, parsing_timeout=timeout, raise_on_error=True)
        pred_parsed = parse(prediction, parsing_timeout=timeout, raise_on_error=True)
        if not gold_parsed or not pred_parsed:
            return None, "unparsed-fallback"
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout, raise_on_error=True)), "math-verify"
    except TimeoutException:
        return None, "timeout-fallback"
    except Exception:  # sympy raises many types on odd input; a string comparison still answers
        return None, "error-fallback"


def serve_math_verify() -> None:
    """The child process of `_IsolatedMathVerify`: JSON requests on stdin, JSON answers on stdout.
    It runs in its own main thread, where math-verify's SIGALRM time limits work."""
    for line in sys.stdin:
        gold, prediction, timeout = json.loads(line)
        equal, method = _math_verify_in_process(gold, prediction, timeout)
        sys.stdout.write(json.dumps([equal, method]) + "\n")
        sys.stdout.flush()


class _IsolatedMathVerify:
    """math-verify in a child process, for callers outside the main thread. The parent waits a bounded
    time and kills the child when sympy is stuck (also in C code, which no signal interrupts).

    A plain `python -c` child rather than `multiprocessing`: spawn re-imports the caller's main
    script (breaking scripts without a __main__ guard) and fork is unsafe after torch started threads.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None

    def _start(self) -> None:
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[2])  # src/ (onsft/data/verify.py)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        self._process = subprocess.Popen(
            [sys.executable, "-c", "from onsft.data.verify import serve_math_verify; serve_math_verify()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            text=True,
            bufsize=1,
        )

    def _stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
        self._process = None

    def __call__(self, gold: str, prediction: str, timeout: int) -> tuple[bool | None, str]:
        with self._lock:
            try:
                if self._process is None or self._process.poll() is not None:
                    self._start()
                self._process.stdin.write(json.dumps([gold, prediction, timeout]) + "\n")
                self._process.stdin.flush()
                # Two parses and one comparison, each bounded in the child, plus start-up on first use.
                ready, _, _ = select.select([self._process.stdout], [], [], 3 * timeout + 30)
                if ready:
                    line = self._process.stdout.readline()
                    if line:
                        equal, method = json.loads(line)
                        return equal, method
                self._stop()
                return None, "timeout-fallback"
            except (OSError, ValueError):
                self._stop()
                return None, "error-fallback"

    def close(self) -> None:
        with self._lock:
            self._stop()


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
        gold = normalize_answer(str(answer))
        return Verdict(bool(gold) and same_answer(extracted, gold), "exact", extracted)


class MathVerifier(Verifier):
    name = "math"

    def __init__(self, timeout_seconds: int = 5, max_answer_chars: int = 1000):
        super().__init__()
        self.timeout_seconds = max(1, int(timeout_seconds))
        self.max_answer_chars = max_answer_chars
        self._isolated: _IsolatedMathVerify | None = None

    def _check(self, response: str, answer: str) -> Verdict:
        answer = str(answer)
        boxed = last_boxed(response)
        extracted = boxed if boxed is not None else extract_final_answer(response)
        gold = normalize_answer(answer)
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
        if threading.current_thread() is threading.main_thread():
            return _math_verify_in_process(gold, prediction, self.timeout_seconds)
        if self._isolated is None:
            self._isolated = _IsolatedMathVerify()
        return self._isolated(gold, prediction, self.timeout_seconds)

    @staticmethod
    def _string(extracted: str | None, gold: str, method: str) -> Verdict:
        if extracted is None:
            return Verdict(False, "no-answer", None)
        return Verdict(normalize_answer(extracted) == gold, method, extracted)

    def close(self) -> None:
        if self._isolated is not None:
            self._isolated.close()
            self._isolated = None


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
