"""The step check (onsft.data.step_check): hand-written true and false equations, with decimals, thousands
separators and currency symbols; what is deliberately left alone; the tolerance; the registry of checkers."""

from fractions import Fraction

import pytest

from onsft.data.step_check import (
    StepCheckConfig,
    StepReport,
    check_arithmetic,
    evaluate,
    find_equations,
    get_step_checker,
    holds,
    parse_number,
)
from onsft.errors import UserError

TRUE = [
    "£2340 + £195 = £2535",
    "So 3 + 4 + 5 = 12, and 12 * 2 = 24.",
    "1,234.5 + 765.5 = 2,000",
    "$1,000,000 - $250,000.25 = $749,999.75",
    "€ 1.50 * 4 = € 6",
    "2.5 x 4 = 10",
    "3 × 4 ÷ 2 = 6",
    "6 − 2 = 4",  # a typographic minus
    "20 - 4 * 3 + 6 / 2 = 11",  # * and / first
    "100 / 4 / 5 = 5",  # left to right
    "-5 + 3 = -2",
    "5 - -3 = 8",
    "0.1 + 0.2 = 0.3",  # exact arithmetic, no float rounding
    "$3 + 4 = 7$",  # $ as a math delimiter
    "Total: \\boxed{40 + 35 = 75}",
    "12 = 3 \\times 4",  # the stated result on the left
    "1\\,000 + 1 = 1\\,001",  # a LaTeX thin space between thousands
    "2 + 3 = 5 * 2 = 10",  # a running chain, read step by step
    "**2 + 3 = 5**",
]
FALSE = [
    ("£2340 + £195 = £28080", "£2340 + £195 = £28080 (computes to 2535)"),
    ("Then 3 + 4 + 5 = 13.", "3 + 4 + 5 = 13 (computes to 12)"),
    ("1,234.5 + 765.5 = 2,001", "1,234.5 + 765.5 = 2,001 (computes to 2000)"),
    ("$19.99 * 3 = $59.99", "$19.99 * 3 = $59.99 (computes to 59.97)"),
    ("€2.50 × 4 = €12", "€2.50 × 4 = €12 (computes to 10)"),
    ("10 / 4 = 2.4", "10 / 4 = 2.4 (computes to 2.5)"),
    ("3 - 5 = 2", "3 - 5 = 2 (computes to -2)"),
    ("12 = 3 \\times 5", "12 = 3 \\times 5 (computes to 15)"),
    ("Let x = 5 + 3 = 9", "5 + 3 = 9 (computes to 8)"),
    ("2 + 3 = **6**", "2 + 3 = 6 (computes to 5)"),
]
# Not plain arithmetic, or possibly part of a larger expression: never checked, so never flagged.
LEFT_ALONE = [
    "2x + 3 = 7",
    "x * 2 + 3 = 7",
    "x - 5 + 3 = 0",
    "(2 + 3) * 4 = 21",
    "2 * (3 + 4) = 15",
    "2^3 + 1 = 10",
    "3² + 4² = 26",
    "5kg + 3kg = 9kg",
    "5 + 3 = 9kg",
    "200 * 10% = 30",
    "10% + 5 = 16",
    "2:30 + 15 = 2:46",
    "7 / 0 = 3",
    "3,5 + 1,5 = 6",  # decimal commas
    "1e3 + 1 = 1002",
    "3 + 4\n= 8",  # an equation broken over lines
    "\\frac{1}{2} + 1 = 2",
    "x = 5",
    "5 = 6",  # no operator: nothing computed
]


@pytest.mark.parametrize("text", TRUE)
def test_true_equations_hold(text):
    report = check_arithmetic(text)
    assert report.checked >= 1 and report.false == [], (text, report)


@pytest.mark.parametrize("text,shown", FALSE)
def test_false_equations_are_found_and_shown_as_written(text, shown):
    assert check_arithmetic(text) == StepReport(1, [shown])


@pytest.mark.parametrize("text", LEFT_ALONE)
def test_what_is_not_plain_arithmetic_is_left_alone(text):
    assert check_arithmetic(text) == StepReport(0, [])


def test_a_response_with_several_steps():
    text = "First, 2 + 2 = 4. Then 4 * 3 = 13.\nSo the answer is 13 - 1 = 12, i.e. \\boxed{12}."
    report = check_arithmetic(text)
    assert report.checked == 3 and report.false == ["4 * 3 = 13 (computes to 12)"]
    assert [(w, v, s) for w, v, s, _ in find_equations(text)] == [
        ("2 + 2 = 4", 4, 4),
        ("4 * 3 = 13", 12, 13),
        ("13 - 1 = 12", 12, 12),
    ]


def test_numbers_and_arithmetic_are_exact():
    assert parse_number("£1,234.50") == (Fraction(123450, 100), 2)
    assert parse_number("-7") == (-7, 0)
    assert parse_number("$ 3") == (3, 0)
    assert parse_number("12,34") is None and parse_number("50%") is None and parse_number("5kg") is None
    assert evaluate([Fraction(1), Fraction(2), Fraction(3)], ["+", "*"]) == 7
    assert evaluate([Fraction(8), Fraction(4), Fraction(2)], ["/", "/"]) == 1
    assert evaluate([Fraction(1), Fraction(0)], ["/"]) is None


def test_tolerance_is_relative_or_the_stated_precision():
    third = Fraction(10, 3)
    assert holds(third, Fraction("3.33"), 2) and holds(third, Fraction("3.3"), 1) and holds(third, Fraction(3), 0)
    assert not holds(third, Fraction("3.34"), 2) and not holds(third, Fraction("3.4"), 1)
    big = Fraction(123456789)
    assert holds(big, big + 100, 0)  # within 1e-6 of the value
    assert not holds(big, big + 1000, 0)
    assert not holds(Fraction(2535), Fraction(2536), 0)


def test_checkers_by_name_module_or_file(tmp_path):
    assert get_step_checker("arithmetic")("1 + 1 = 3").false == ["1 + 1 = 3 (computes to 2)"]
    (tmp_path / "steps.py").write_text(
        "def no_sevens(text):\n    return [line for line in text.splitlines() if '7' in line]\n"
        "def fine(text):\n    return True\n"
        "def broken(text):\n    return 3\n"
    )
    custom = get_step_checker(f"{tmp_path / 'steps.py'}:no_sevens")
    assert custom("a 7\nb\nc 77") == StepReport(2, ["a 7", "c 77"])
    assert get_step_checker(f"{tmp_path / 'steps.py'}:fine")("x") == StepReport(1, [])
    with pytest.raises(UserError, match="returned int"):
        get_step_checker(f"{tmp_path / 'steps.py'}:broken")("x")
    with pytest.raises(UserError, match="unknown step checker `sympy`") as error:
        get_step_checker("sympy")
    assert error.value.where == "--step_checker"
    with pytest.raises(UserError, match="step checker file not found"):
        get_step_checker(f"{tmp_path / 'missing.py'}:f")
    with pytest.raises(UserError, match="unknown step_check `maybe`"):
        StepCheckConfig(step_check="maybe").validate()
    assert StepCheckConfig(step_check="off").build_step_checker() is None
    assert StepCheckConfig().build_step_checker().name == "arithmetic"
