"""The hinted context of rewriting: a system instruction, the question and the reference solution.

The format comes from the flags, else the model folder's onsft.json (`hint_template`, `hint_system`,
`answer_marker`; the organism was pretrained on exactly that format), else a generic instruction to
rewrite the reference as the model's own step-by-step reasoning.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from onsft.data.rows import Messages
from onsft.engine.hinted import ANSWER_MARKER
from onsft.errors import UserError

DEFAULT_HINT_SYSTEM = (
    "You will be given a question and a reference solution that is known to be correct. Rewrite the "
    "solution as your own step-by-step reasoning, in your own words and style, so that it reaches the same "
    "final answer. Do not mention that a reference was given. Put the final answer in \\boxed{}."
)
DEFAULT_ANALYZE_SYSTEM = (
    "You will be given a question and a reference solution that is known to be correct. First write a "
    "`# Analyze` section that checks the reference line by line until you fully understand it. Then write "
    "a `# CoT` section: your own complete step-by-step reasoning, in your own words and style, reaching the "
    "same final answer without mentioning the reference. Put the final answer in \\boxed{}."
)
DEFAULT_HINT_TEMPLATE = "# Question\n{question}\n\n# Reference solution\n{reference}"
PLACEHOLDERS = ("question", "reference")


@dataclass
class HintSettings:
    """How the hinted context is built, resolved from the flags and the model folder's onsft.json."""

    template: str
    system: str
    answer_marker: str
    source: str  # where the template came from: flag, onsft.json or default


def resolve_hint(
    template: str | None, system: str | None, marker: str | None, analyze_first: bool, info: dict
) -> HintSettings:
    """The hint format: flags win, then the model's onsft.json (the format it was trained on), then the
    generic instruction (with the analyze-first variant of the system text)."""
    has_template = isinstance(info.get("hint_template"), str)
    source = "flag" if template is not None else "onsft.json" if has_template else "default"
    if template is None:
        template = info["hint_template"] if has_template else DEFAULT_HINT_TEMPLATE
    if system is None and has_template:
        # The model learned its template as it is; a system turn it never saw would change the context.
        system = str(info.get("hint_system") or "")
    elif system is None:
        system = DEFAULT_ANALYZE_SYSTEM if analyze_first else DEFAULT_HINT_SYSTEM
    if marker is None:
        marker = str(info.get("answer_marker", ANSWER_MARKER))
    missing = [p for p in PLACEHOLDERS if "{" + p + "}" not in template]
    if missing:
        raise UserError(
            f"the hint template has no {{{missing[0]}}} placeholder",
            where=f"hint template ({source})",
            fix="write a template containing both {question} and {reference}.",
        )
    return HintSettings(template, system, marker, source)


_PLACEHOLDER = re.compile(r"\{(question|reference)\}")


def fill_hint(template: str, question: str, reference: str) -> str:
    """The template with {question} and {reference} replaced in one pass (other braces, e.g. LaTeX, stay;
    a question that itself contains "{reference}" is not expanded again)."""
    values = {"question": question, "reference": reference}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def hinted_messages(prompt: Messages, reference: str, hint: HintSettings) -> Messages:
    """The hinted context's chat: [hint system] + earlier non-system turns + the filled hint template.

    {question} is the last user turn, preceded by the prompt's own system text when it has one (the
    hint's system turn takes the system slot, as in the reference code). Turns after the last user turn,
    if any, follow the hint unchanged."""
    last = max(i for i, turn in enumerate(prompt) if turn["role"] == "user")
    own_system = [turn["content"] for turn in prompt if turn["role"] == "system"]
    question = "\n\n".join(own_system + [prompt[last]["content"]])
    history = [turn for turn in prompt[:last] if turn["role"] != "system"]
    system = [{"role": "system", "content": hint.system}] if hint.system else []
    user = {"role": "user", "content": fill_hint(hint.template, question, reference)}
    return system + history + [user] + list(prompt[last + 1 :])
