"""math-verify with bounded time, in any thread.

math-verify bounds each parse and comparison with SIGALRM, which only works in the main thread. In any other
thread (a data loader, a server) `BoundedMathVerify` runs it in a child process instead and kills the child
when it overruns (sympy can be stuck in C code, which no signal interrupts). Either way an answer that could not
be decided comes back as `None` with the reason, for the caller's string fallback, never a crash or a hang.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
from pathlib import Path

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
        package_root = str(Path(__file__).resolve().parents[2])  # src/ (onsft/data/math_verify_runner.py)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        self._process = subprocess.Popen(
            [sys.executable, "-c", "from onsft.data.math_verify_runner import serve_math_verify; serve_math_verify()"],
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


class BoundedMathVerify:
    """(gold, prediction, timeout) -> (equal or None, method): in this process on the main thread, else in a
    child process started on first use (`close` stops it)."""

    def __init__(self):
        self._isolated: _IsolatedMathVerify | None = None

    def __call__(self, gold: str, prediction: str, timeout: int) -> tuple[bool | None, str]:
        if threading.current_thread() is threading.main_thread():
            return _math_verify_in_process(gold, prediction, timeout)
        if self._isolated is None:
            self._isolated = _IsolatedMathVerify()
        return self._isolated(gold, prediction, timeout)

    def close(self) -> None:
        if self._isolated is not None:
            self._isolated.close()
            self._isolated = None
