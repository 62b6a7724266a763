"""Rewrite profiles: the hinted-context format a model family needs, picked up by `onsft rewrite` without flags.

The generic hinted context (a system instruction, then the question and the reference in one user turn) is
the paper's, written for 7B instruction models. Small chat models do not follow it: SmolLM2-135M-Instruct
answered "I'm ready to help. What's your next question?" to it, and it never writes `\\boxed{` by itself
(0 of 64 greedy answers on each of five reasoning-gym tasks), so the hand-over to the plain context at the
answer marker almost never happened. A profile says, for one family, how its hinted context is built and
where it hands over:

- `form="restate"`: the plain prompt, the reference as the model's own earlier answer, and a follow-up user
  turn asking to write the solution again (`followup`). The hinted context is then the plain one plus two
  turns, in the chat format the model was tuned on, so the model stays itself and has the solution in view.
- `answer_marker`: hand-over markers separated by `|`: `\\boxed{` and the phrase the model ends with by
  habit ("The final answer is ...", "The answer is ..."), after which its plain context alone finishes.
- `beta`: the entropy scale of the mixing. A small model's hinted context is unsure more often (higher
  entropy), so beta 3 gives the plain context, which cannot solve the task, most of the choices.
- `marker_before_stop`: EOS is masked while the hinted context leads. SmolLM2 often ends a short solution
  right after its last line ("4 - 1 = 3", then EOS) without any marker, so the answer was the hinted
  context's; with the mask it goes on to "The final answer is ...", which the plain context finishes.

Measured on SmolLM2 in docs/study-smollm2.md (`onsft rewrite` summaries): why these values.
A model matches a profile when one of its `keys` occurs in its name or path, its config's `_name_or_path`, or
its chat template (so a fine-tuned copy keeps the profile of its family). Flags and the model folder's
onsft.json win over a profile.
"""

from __future__ import annotations

from dataclasses import dataclass

RESTATE_FOLLOWUP = "Please write your solution again, step by step, and end with the final answer in \\boxed{}."


@dataclass(frozen=True)
class RewriteProfile:
    name: str
    keys: tuple[str, ...]  # lower-case substrings of a model's name, path or chat template
    form: str  # "instruction" (system + one user turn) or "restate" (see the module doc)
    followup: str = RESTATE_FOLLOWUP
    system: str = ""  # "" = the chat template's own default system turn, as in the plain context
    answer_marker: str = "\\boxed{"
    beta: float | None = None  # None: HintedConfig's default
    marker_before_stop: bool = False  # mask EOS until a marker: the plain context always writes the answer


PROFILES = (
    RewriteProfile(
        name="smollm2",
        keys=("smollm",),
        form="restate",
        answer_marker="\\boxed{|answer is",
        beta=1.0,
        marker_before_stop=True,
    ),
)


def find_profile(names: list[str], chat_template: str | None) -> RewriteProfile | None:
    """The first profile whose key occurs in one of `names` or in the chat template (None: no profile)."""
    texts = [name.lower() for name in names if name] + [(chat_template or "").lower()]
    return next((p for p in PROFILES if any(key in text for key in p.keys for text in texts)), None)


def model_profile(model_name: str, model_config=None, tokenizer=None) -> RewriteProfile | None:
    """The profile of a model from its name (as given), its config and its tokenizer's chat template."""
    names = [str(model_name), str(getattr(model_config, "_name_or_path", "") or "")]
    template = getattr(tokenizer, "chat_template", None)
    return find_profile(names, template if isinstance(template, str) else None)
