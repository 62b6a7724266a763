"""The hinted context of rewriting: a system instruction, the question and the reference solution.

The format comes from the flags, else the model folder's onsft.json (`hint_template`, `hint_system`,
`answer_marker`; the organism was pretrained on exactly that format), else the model family's rewrite profile
(`onsft.pipeline.rewrite.hint_profiles`, e.g. SmolLM2), else a generic instruction to rewrite the reference as the
model's own step-by-step reasoning. Two forms:

- instruction: [system instruction] + [user: the template filled with the question and the reference];
- restate: the plain prompt + [assistant: the reference] + [user: a follow-up asking to write the solution
  again]: the plain context with the solution in view, for models that do not follow a rewrite instruction.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from onsft.data.rows import Messages
from onsft.engine.hinted import ANSWER_MARKER
from onsft.errors import UserError
from onsft.pipeline.rewrite.hint_profiles import RESTATE_FOLLOWUP, RewriteProfile

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
FORMS = ("auto", "instruction", "restate")


@dataclass
class HintSettings:
    """How the hinted context is built, resolved from the flags and the model folder's onsft.json."""

    template: str
    system: str
    answer_marker: str
    source: str  # where the format came from: flag, onsft.json, profile:NAME or default
    form: str = "instruction"  # or "restate" (see the module doc)
    followup: str = ""  # restate: the user turn after the reference
    beta: float | None = None  # the mixing's entropy scale (None: HintedConfig's default)
    marker_before_stop: bool = False  # hinted decoding masks EOS until an answer marker (HintedConfig's help)


def resolve_hint(
    template: str | None,
    system: str | None,
    marker: str | None,
    analyze_first: bool,
    info: dict,
    profile: RewriteProfile | None = None,
    *,
    form: str = "auto",
    followup: str | None = None,
    beta: float | None = None,
    marker_before_stop: bool | None = None,
) -> HintSettings:
    """The hint format: flags win, then the model's onsft.json (the format it was trained on), then the model
    family's rewrite profile, then the generic instruction (with the analyze-first variant of the system
    text). A template or system text given by flag or onsft.json means the instruction form unless `form`
    says otherwise; `beta` and `marker_before_stop` (the flags) win over the profile's."""
    has_template = isinstance(info.get("hint_template"), str)
    own_format = template is not None or system is not None or has_template
    use = profile if profile is not None and not own_format and form in ("auto", profile.form) else None
    if form == "auto":
        form = use.form if use is not None else "instruction"
    if form not in FORMS[1:]:
        raise UserError(f"unknown hint form `{form}`", where="--hint_form", fix=f"use one of {', '.join(FORMS)}.")
    source = "flag" if template is not None else "onsft.json" if has_template else "default"
    if source == "default" and use is not None:
        source = f"profile:{use.name}"
    if template is None:
        template = info["hint_template"] if has_template else DEFAULT_HINT_TEMPLATE
    if system is None and has_template:
        # The model learned its template as it is; a system turn it never saw would change the context.
        system = str(info.get("hint_system") or "")
    elif system is None and form == "restate":
        # The plain context's own system turn (the chat template's default): the hinted context stays the plain one.
        system = use.system if use is not None else ""
    elif system is None:
        system = DEFAULT_ANALYZE_SYSTEM if analyze_first else DEFAULT_HINT_SYSTEM
    if marker is None:
        marker = str(info.get("answer_marker", use.answer_marker if use is not None else ANSWER_MARKER))
    if followup is None:
        followup = use.followup if use is not None else RESTATE_FOLLOWUP
    if beta is None and use is not None:
        beta = use.beta
    if marker_before_stop is None:
        marker_before_stop = use.marker_before_stop if use is not None else False
    missing = [p for p in PLACEHOLDERS if "{" + p + "}" not in template] if form == "instruction" else []
    if missing:
        raise UserError(
            f"the hint template has no {{{missing[0]}}} placeholder",
            where=f"hint template ({source})",
            fix="write a template containing both {question} and {reference}.",
        )
    if form == "restate" and not followup.strip():
        raise UserError(
            "the restate form needs a follow-up turn", where="--hint_followup", fix="pass a non-empty text."
        )
    return HintSettings(
        template, system, marker, source, form, followup if form == "restate" else "", beta, marker_before_stop
    )


_PLACEHOLDER = re.compile(r"\{(question|reference)\}")


def fill_hint(template: str, question: str, reference: str) -> str:
    """The template with {question} and {reference} replaced in one pass (other braces, e.g. LaTeX, stay;
    a question that itself contains "{reference}" is not expanded again)."""
    values = {"question": question, "reference": reference}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def hinted_messages(prompt: Messages, reference: str, hint: HintSettings) -> Messages:
    """The hinted context's chat. Restate form: the prompt as it is (a hint system text, if any, replaces
    its system turn) + [assistant: reference] + [user: follow-up]. Instruction form: [hint system] + earlier
    non-system turns + the filled hint template.

    {question} is the last user turn, preceded by the prompt's own system text when it has one (the
    hint's system turn takes the system slot, as in the reference code). Turns after the last user turn,
    if any, follow the hint unchanged."""
    if hint.form == "restate":
        turns = [turn for turn in prompt if not (hint.system and turn["role"] == "system")]
        system = [{"role": "system", "content": hint.system}] if hint.system else []
        return (
            system + turns + [{"role": "assistant", "content": reference}, {"role": "user", "content": hint.followup}]
        )
    last = max(i for i, turn in enumerate(prompt) if turn["role"] == "user")
    own_system = [turn["content"] for turn in prompt if turn["role"] == "system"]
    question = "\n\n".join(own_system + [prompt[last]["content"]])
    history = [turn for turn in prompt[:last] if turn["role"] != "system"]
    system = [{"role": "system", "content": hint.system}] if hint.system else []
    user = {"role": "user", "content": fill_hint(hint.template, question, reference)}
    return system + history + [user] + list(prompt[last + 1 :])
