"""Verifiers: math-verify equivalences and its fallbacks, exact-match normalisation, user functions."""

import sys
import threading
import time

import pytest

from onsft.data.verify import extract_final_answer, get_verifier, last_boxed, normalize_answer
from onsft.errors import UserError

MATH = get_verifier("math", timeout_seconds=1)


@pytest.mark.parametrize(
    "response, gold",
    [
        ("so \\boxed{1/2}", "0.5"),
        ("\\boxed{\\frac12}", "0.5"),
        ("\\boxed{0.5}", "\\frac{1}{2}"),
        ("\\boxed{50\\%}", "0.5"),  # math-verify reads a percent as /100: documented as equal
        ("\\boxed{10.0}", "10"),
        ("\\boxed{1+x}", "x+1"),
        ("\\boxed{\\{2,1\\}}", "\\{1,2\\}"),
        ("first \\boxed{3}, then \\boxed{\\dfrac{3}{4}}", "0.75"),  # the last box counts
    ],
)
def test_math_equivalences(response, gold):
    verdict = MATH.check(response, gold)
    assert verdict.correct and verdict.method == "math-verify"


@pytest.mark.parametrize(
    "response, gold, method",
    [
        ("\\boxed{0.6}", "0.5", "math-verify"),
        ("\\boxed{3}, not \\boxed{1/2}", "3", "math-verify"),
        ("\\boxed{BCDA}", "bcda", "word-fallback"),
        # math-verify reads letters as a product of symbols (abc == cba); words are compared as strings
        ("\\boxed{cba}", "abc", "word-fallback"),
        ("I do not know", "5", "no-answer"),
        ("\\boxed{5", "5", "no-answer"),  # an unclosed box (truncated response) is no answer
    ],
)
def test_math_rejections(response, gold, method):
    verdict = MATH.check(response, gold)
    assert not verdict.correct and verdict.method == method


def test_math_word_answers_and_text_wrappers():
    assert MATH.check("\\boxed{\\text{yes}}", "yes").correct
    assert MATH.check("\\boxed{abc}", "abc").method == "word-fallback"


def test_math_without_a_box_uses_math_verify_extraction_then_strings():
    assert MATH.check("The answer is 7 apples", "7").method == "math-verify"
    verdict = MATH.check("Final answer: @@", "@@")  # nothing math-verify can parse in the response
    assert verdict.correct and verdict.method == "unparsed-fallback" and verdict.extracted == "@@"


def test_math_timeout_falls_back_to_string_comparison_without_crashing():
    started = time.time()
    verdict = MATH.check("\\boxed{(10^7)!}", "5")  # sympy would compute a 65-million-digit number
    assert time.time() - started < 10
    assert verdict.method == "timeout-fallback" and not verdict.correct
    assert MATH.stats["timeout-fallback"] >= 1


def test_math_outside_the_main_thread_runs_isolated_and_agrees():
    cases = [("\\boxed{1/2}", "0.5", True), ("\\boxed{0.6}", "0.5", False), ("\\boxed{cba}", "abc", False)]
    verifier = get_verifier("math", timeout_seconds=1)
    results = []
    worker = threading.Thread(target=lambda: results.extend(verifier.check(r, g) for r, g, _ in cases))
    worker.start()
    worker.join(timeout=60)
    verifier.close()
    assert [v.correct for v in results] == [expected for _, _, expected in cases]
    assert results[0].method == "math-verify"


def test_extraction():
    assert last_boxed("a \\boxed{\\frac{1}{2}} b") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{1} and \\boxed{{2}}") == "{2}"
    assert last_boxed("\\boxed{1} and \\boxed{2") is None
    assert extract_final_answer("work...\n#### 72") == "72"
    assert extract_final_answer("So the answer is 3.") == "3."
    assert extract_final_answer("Final answer: -4") == "-4"
    assert extract_final_answer("nothing here") is None


@pytest.mark.parametrize(
    "raw, normal",
    [
        ("  42 ", "42"),
        ("$42$", "42"),
        ("$ 42 $.", "42"),
        ("\\text{yes}", "yes"),
        ("\\mathrm{ Paris }", "Paris"),
        ("a   b\n c", "a b c"),
        ("aBc", "aBc"),
    ],
)
def test_normalize_answer(raw, normal):
    assert normalize_answer(raw) == normal


def test_exact_verifier():
    exact = get_verifier("exact")
    assert exact("Let's cycle. abcd -> bcda. \\boxed{bcda}", "bcda")
    assert not exact("\\boxed{BCDA}", "bcda")  # case-sensitive
    assert exact("The answer is $42$.", "42")
    assert exact("#### 7", " 7 ")
    assert exact("bcda", "bcda")  # no marker: the whole response is the answer
    assert not exact("\\boxed{0.5}", "1/2")  # exact is not math
    assert not exact("anything", "")


def test_user_function_from_a_file_and_a_module(tmp_path, monkeypatch):
    source = (
        "def check(response, answer):\n    return response.strip().endswith(answer)\n"
        "def score(response, answer):\n    return 0.7 if answer in response else 0.2\n"
    )
    path = tmp_path / "grade.py"
    path.write_text(source)
    by_file = get_verifier(f"{path}:check")
    assert by_file("it is 5", "5") and not by_file("5 it is", "5")
    scored = get_verifier(f"{path}:score")
    verdict = scored.check("has 5", "5")
    assert verdict.correct and verdict.score == pytest.approx(0.7) and verdict.method == "custom"
    assert not scored("none", "5")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("grade", None)
    by_module = get_verifier("grade:check")
    assert by_module("x 9", "9")


def test_user_function_errors_are_user_errors(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("def boom(response, answer):\n    raise KeyError('x')\n")
    with pytest.raises(UserError, match="raised KeyError"):
        get_verifier(f"{path}:boom")("r", "a")


@pytest.mark.parametrize(
    "spec",
    [
        "nope",
        "",
        "missing_file.py:check",
        "os:no_such_function",
        "no_such_module_xyz:check",
        "grade.py:not an identifier",
        ":check",
    ],
)
def test_bad_specs_are_user_errors(spec):
    with pytest.raises(UserError):
        get_verifier(spec)


def test_exact_compares_plain_numbers_as_numbers_and_anything_else_as_text():
    """Issue 21: `--verifier exact` judged `30.0` wrong against the gold `30`."""
    exact = get_verifier("exact")
    for response, gold in [("\\boxed{30.0}", "30"), ("\\boxed{30}", "30.0"), ("-.5", "-0.50"), ("\\boxed{+7}", "7")]:
        assert exact.check(response, gold).correct, (response, gold)
    for response, gold in [
        ("\\boxed{31}", "30"),
        ("\\boxed{ABC}", "abc"),
        ("\\boxed{30 apples}", "30"),
        ("1e3", "1000"),
    ]:
        assert not exact.check(response, gold).correct, (response, gold)


@pytest.mark.parametrize("name", ["exact", "math"])
def test_a_gold_answer_stored_boxed_is_read_as_its_content(name):
    """Issue 21: `--verifier exact` judged `30.0` wrong against the gold `\\boxed{30}` (datasets store answers
    boxed, or whole solutions ending in a box)."""
    verifier = get_verifier(name)
    for response, gold in [
        ("\\boxed{30.0}", "\\boxed{30}"),
        ("so the answer is 30", "$\\boxed{30}$"),
        ("\\boxed{30}", "Add 10 and 20 to get \\boxed{30}."),
    ]:
        assert verifier.check(response, gold).correct, (name, response, gold)
    assert not verifier.check("\\boxed{31}", "\\boxed{30}").correct
