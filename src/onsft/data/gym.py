"""reasoning-gym tasks as onsft data, and their own answer scorers as onsft verifiers.

The `reasoning-gym` package (optional extra: `pip install 'onsft[tasks]'`) generates ~100 reasoning
tasks procedurally: any size, reproducible for a seed, each with a gold answer and a task-specific
scorer. Here a task becomes rows in the layout `onsft.data` reads:

    rows = gym_rows("gsm_symbolic", size=64, seed=0)        # or: onsft data gym --task ... --out f.jsonl
    {"id": "gsm_symbolic-0-3", "task": "gsm_symbolic", "prompt": "...", "answer": "19",
     "reference": "...", "completion": "...", "reference_source": "task", "metadata": {...}}

- `prompt`: the task's question; with `answer_format="boxed"` (the default) followed by
  BOXED_INSTRUCTION, so answers end in \\boxed{} as `onsft.data.verify`'s math verifier expects.
- `answer`: the task's gold answer, unchanged.
- `reference` (and `completion` = reference, so the rows train directly) where a worked solution
  exists: gsm_symbolic ships a GSM8K-style one in `metadata["answer_cot"]` (`reference_source:
  "task"`); its closing `#### X` line becomes "The final answer is \\boxed{gold}." under the boxed
  format (X is sometimes written `8.0` for a gold `8`; the box holds the gold answer as the task
  states it). chain_sum, gcd and leg_counting get a short worked solution built from their metadata
  (`onsft.data.gym_references`: a running sum, the Euclidean algorithm, legs per animal and their sum;
  `reference_source: "derived"`). Other tasks have no reference, hence no `completion`: they can be
  evaluated or rewritten from the model's own samples, not trained on directly.
- `metadata`: the task's metadata as JSON (tuples become lists), kept for `score_row`.
Rows `i` of (task, size, seed, options) are the task's items `i`: a bigger size only appends rows.

Verifiers. A verifier sees (response, answer) only, so the task is named in the function:
`--verifier onsft.data.gym:score_<task>`, e.g. `onsft.data.gym:score_gsm_symbolic`, resolved on demand (module
`__getattr__`) into `scorer(task)`. The answer is taken from the response as: the last \\boxed{...};
else the last <answer>...</answer> (reasoning-gym's own convention); else a GSM8K `#### X` line or a
"the answer is X" line; else the whole response (tasks that ask for the bare value). The task's
`score_answer` returns a float (1.0 correct; gsm_symbolic gives 0.01 to a wrong number), which the
verifier counts as correct at >= 0.5. A few tasks score against metadata (several valid answers, a
target to reach) that a (response, answer) verifier cannot see; `scorer` refuses those with a
UserError, and `score_row(response, row)` scores them from an exported row instead.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Mapping
from typing import Any

from onsft.data.gym_references import BUILDERS, chain_sum_reference  # noqa: F401 (re-exported)
from onsft.data.verify import extract_final_answer, last_boxed, normalize_answer
from onsft.errors import UserError

REQUIREMENT = "reasoning-gym>=0.1.20"
INSTALL_FIX = "pip install 'onsft[tasks]' (or: pip install 'reasoning-gym>=0.1.20')."
BOXED_INSTRUCTION = "Put your final answer in \\boxed{}."
ANSWER_FORMATS = ("boxed", "raw")
SCORER_PREFIX = "score_"
CORRECT_AT = 0.5  # what onsft.data.verify.CallableVerifier counts as correct for a float score


def _gym():
    try:
        import reasoning_gym
    except ImportError:
        raise UserError("reasoning-gym is not installed", where="onsft.data.gym", fix=INSTALL_FIX) from None
    return reasoning_gym


def task_names() -> list[str]:
    """Every task name reasoning-gym registers (its generators), sorted."""
    from reasoning_gym.factory import DATASETS

    _gym()
    return sorted(name for name in DATASETS if name != "composite")  # composite needs a list of sub-tasks


def _check_task(task: str) -> None:
    names = task_names()
    if task not in names:
        close = [n for n in names if task.lower().replace("-", "_") in n]
        hint = f"did you mean {', '.join(close[:5])}?" if close else "`onsft data gym --list_tasks` prints them all."
        raise UserError(f"unknown reasoning-gym task `{task}`", where="--task", fix=hint)


def make_dataset(task: str, size: int, seed: int, options: Mapping[str, Any] | None = None):
    """The task's reasoning-gym dataset; a bad size or option is a UserError naming the task."""
    _check_task(task)
    if size < 1:
        raise UserError(f"size must be >= 1, got {size}", where="--size", fix="pass a positive --size.")
    from reasoning_gym.factory import DATASETS

    config_type = DATASETS[task][1]
    known = set(getattr(config_type, "__dataclass_fields__", {})) - {"seed", "size"}
    unknown = sorted(set(options or {}) - known)
    if unknown:
        raise UserError(
            f"task `{task}` has no option `{unknown[0]}`",
            where="--options",
            fix=f"its options are: {', '.join(sorted(known)) or 'none'}.",
        )
    try:
        return _gym().create_dataset(task, size=size, seed=seed, **dict(options or {}))
    except (AssertionError, ValueError, TypeError) as error:  # the task configs validate with assert
        raise UserError(
            f"task `{task}` rejects these settings ({type(error).__name__}: {error})",
            where="--options",
            fix="check the values against the task's config.",
        ) from None


def _plain_json(value: Any) -> Any:
    """Metadata as JSON can hold it (tuples to lists, odd objects to strings), so rows round-trip."""
    return json.loads(json.dumps(value, default=str))


_FINAL_LINE = re.compile(r"\n?[ \t]*####[^\n]*\s*$")


def gsm_reference(cot: str, answer: str, answer_format: str = "boxed") -> str:
    """gsm_symbolic's worked solution; under `boxed` its final `#### X` line becomes a boxed answer."""
    text = cot.strip()
    if answer_format == "raw":
        return text
    body = _FINAL_LINE.sub("", text).rstrip()
    return f"{body}\nThe final answer is \\boxed{{{answer}}}." if body else f"The final answer is \\boxed{{{answer}}}."


def _reference(task: str, entry: dict, answer_format: str) -> tuple[str | None, str | None]:
    """(reference, source) for one item: the task's own worked solution, one built here, or none."""
    metadata = entry.get("metadata") or {}
    if task == "gsm_symbolic" and isinstance(metadata.get("answer_cot"), str):
        return gsm_reference(metadata["answer_cot"], entry["answer"], answer_format), "task"
    if task in BUILDERS:
        reference = BUILDERS[task](metadata, str(entry["answer"]), answer_format)
        return (reference, "derived") if reference else (None, None)
    return None, None


def gym_rows(
    task: str,
    size: int,
    seed: int = 0,
    *,
    options: Mapping[str, Any] | None = None,
    answer_format: str = "boxed",
    metadata: bool = True,
) -> list[dict]:
    """`size` items of a reasoning-gym task as onsft rows (see the module docstring for the columns).
    Deterministic for (task, size, seed, options); `options` are the task's own config fields."""
    if answer_format not in ANSWER_FORMATS:
        raise UserError(
            f"unknown answer format `{answer_format}`",
            where="--answer_format",
            fix=f"use one of {', '.join(ANSWER_FORMATS)}.",
        )
    dataset = make_dataset(task, size, seed, options)
    rows = []
    for i in range(size):
        entry = dataset[i]
        question = str(entry["question"]).rstrip()
        prompt = f"{question}\n\n{BOXED_INSTRUCTION}" if answer_format == "boxed" else question
        row = {"id": f"{task}-{seed}-{i}", "task": task, "prompt": prompt, "answer": str(entry["answer"])}
        reference, source = _reference(task, entry, answer_format)
        if reference:
            row.update(reference=reference, completion=reference, reference_source=source)
        if metadata:
            row["metadata"] = _plain_json(entry.get("metadata") or {})
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ scoring


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_answer(response: str) -> str:
    """The final answer in a response: last \\boxed{}, else last <answer>...</answer>, else a `#### X`
    or "the answer is X" line, else the whole response (stripped)."""
    boxed = last_boxed(response)
    if boxed is not None:
        return normalize_answer(boxed)
    tagged = _ANSWER_TAG.findall(response)
    if tagged:
        return tagged[-1].strip()
    final = extract_final_answer(response)
    return (final if final is not None else response).strip()


def score_entry(task: str, response: str, entry: Mapping[str, Any]) -> float:
    """The task's own score (0..1) of a response against a full entry (answer and metadata)."""
    dataset = _scoring_dataset(task)
    return float(dataset.score_answer(extract_answer(response), dict(entry)))


def score_row(response: str, row: Mapping[str, Any]) -> float:
    """Score against an exported row (its `task`, `answer` and `metadata`): works for every task."""
    if "task" not in row or "answer" not in row:
        raise UserError(
            "row has no `task` or `answer` column",
            where="score_row",
            fix="pass a row written by gym_rows / `onsft data gym`.",
        )
    entry = {"question": row.get("prompt", ""), "answer": row["answer"], "metadata": row.get("metadata") or {}}
    return score_entry(str(row["task"]), response, entry)


@functools.cache
def _scoring_dataset(task: str):
    # score_answer only reads the entry; a one-item dataset with the default config carries the method.
    return make_dataset(task, 1, 0)


@functools.cache
def needs_metadata(task: str) -> bool:
    """Whether the task's scorer needs more than the gold answer: checked on one generated item by
    scoring its gold answer with and without the metadata (an error or a different score = needed)."""
    dataset = _scoring_dataset(task)
    entry = dataset[0]
    full = dataset.score_answer(str(entry["answer"]), entry)
    try:
        bare = dataset.score_answer(str(entry["answer"]), {"question": "", "answer": entry["answer"], "metadata": {}})
    except Exception:  # the scorer reached for metadata: KeyError, TypeError, ...
        return True
    return bare != full


def scorer(task: str) -> Callable[[str, str], float]:
    """A verifier fn(response, answer) -> float for one task (the task's own `score_answer`)."""
    _check_task(task)
    if needs_metadata(task):
        raise UserError(
            f"task `{task}` scores answers against its metadata, which a (response, answer) verifier does not see",
            where=f"onsft.data.gym:{SCORER_PREFIX}{task}",
            fix="score exported rows in Python with onsft.data.gym.score_row(response, row).",
        )

    def score(response: str, answer: str) -> float:
        return score_entry(task, response, {"question": "", "answer": str(answer), "metadata": {}})

    score.__name__ = f"{SCORER_PREFIX}{task}"
    score.__qualname__ = score.__name__
    score.__doc__ = f"reasoning-gym's score_answer of task `{task}` (correct at >= {CORRECT_AT})."
    return score


def __getattr__(name: str):
    # `--verifier onsft.data.gym:score_<task>` arrives here through getattr(module, name).
    if name == "score":
        raise UserError(
            "`onsft.data.gym:score` needs the task in its name",
            where="--verifier",
            fix="use onsft.data.gym:score_<task>, e.g. onsft.data.gym:score_gsm_symbolic.",
        )
    if name.startswith(SCORER_PREFIX) and len(name) > len(SCORER_PREFIX):
        function = scorer(name[len(SCORER_PREFIX) :])
        globals()[name] = function  # later lookups find it directly
        return function
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
