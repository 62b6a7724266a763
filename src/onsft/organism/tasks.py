"""Synthetic task families of the model organism, with known answers, generated from a seed.

Old skills (the organism learns them in pretraining, always answered in one native style):
    compare  "Compare 45 and 23."            -> "Let's compare. 45 > 23. \\boxed{45}"
    reverse  "Reverse abcd."                  -> "Let's reverse. abcd -> dcba. \\boxed{dcba}"
    copy     "Copy abcd."                     -> "Let's copy. abcd -> abcd. \\boxed{abcd}"
    count    "Count the characters in abcd."  -> "Let's count. abcd -> 4. \\boxed{4}"
Strings have 3-7 distinct characters, lowercase or (40%) mixed with capitals and digits.
Opaque verbs: made-up verbs ("Dovek abcd.") whose answer is a random string that only a reference
can reveal; native form "Let's transform. abcd -> qzsk. \\boxed{qzsk}". Pretraining on them with the
hint template teaches the hinted context to carry a reference's answer into the native style, and
without the hint teaches the plain context to box the answer it stated.

New skill (unknown to the organism): "Cycle abcd." -> "bcda" (rotate left by one). Old verbs are
single template tokens, opaque verbs are character-level pseudo-words drawn without "Cycle", so the
new verb shares no token with a verb the organism knows. Its training data comes in several teacher
styles, from the organism's own form ("native") to very foreign ("solution"), so a study can show
where IDFT helps and where data is too off-policy to learn from.

Held-out rule: a prompt is held out when a hash of its text says so (`is_held_out`). Pretraining and
the new skill's training set use only other prompts; every test set uses only held-out prompts, so
no test prompt was ever trained on, whatever the seeds.

Everything here is a pure function of its seed (`random.Random(f"{seed}:{name}")`, stable across
processes and platforms).
"""

from __future__ import annotations

import hashlib
import random
import string
from collections.abc import Callable
from pathlib import Path

from onsft.data.verify import last_boxed
from onsft.runtime.records import write_jsonl_atomic

ANSWER_MARKER = "\\boxed{"
# The user message of the hinted context. Recorded in the checkpoint's onsft.json: the rewrite command
# must build the hinted context with exactly the format the organism learned.
HINT_TEMPLATE = "Rewrite the reference in your own style.\n{question}\nReference: {reference}"

OLD_TASKS = ("compare", "reverse", "copy", "count")
NEW_TASK = "cycle"
NEW_VERB = "Cycle"
LOWER = string.ascii_lowercase
MIXED = string.ascii_lowercase + string.ascii_uppercase + string.digits
OLD_LENGTHS = (3, 7)  # string lengths of old skills and opaque verbs in pretraining (inclusive)
NEW_LENGTHS = (3, 6)  # the new skill's training and in-domain test lengths
OOD_LENGTHS = (7, 7)  # seen in pretraining for other skills, never for the new one
HELD_OUT_PERCENT = 10
MIXED_SHARE = 0.4  # share of old-skill strings drawn from MIXED rather than LOWER

# Teacher styles of the new skill, from the organism's own form to far off-policy (mean phi per token
# under the organism: see onsft.json, "new_skill_teacher_mean_phi"). Each is (name, template); fields:
# {x} input, {y} answer, {h} first character, {t} the rest.
TEACHER_STYLES: tuple[tuple[str, str], ...] = (
    ("native", "Let's transform. {x} -> {y}. \\boxed{{{y}}}"),  # exactly the organism's own form
    ("mild", "Let's transform. {x} -> {y}. \\boxed{{{y}}}."),  # one stray period where it would stop
    ("terse", "{x} -> {y}. \\boxed{{{y}}}"),  # no opener: the first tokens surprise it
    (
        "verbose",
        "Take {x}, remove its first character {h} and append it after {t}. "
        "The result is {y}. Final answer: \\boxed{{{y}}}",
    ),
    ("solution", "Solution: the rotation of {x} is {y}, hence \\boxed{{{y}}}"),  # the notes' far style
)
STYLE_NAMES = tuple(name for name, _ in TEACHER_STYLES)


# ---------------------------------------------------------------- answers and checks


def boxed_answer(text: str) -> str | None:
    """Content of the last \\boxed{...} in `text` (braces balanced), or None when there is none."""
    return last_boxed(text)


def is_correct(response: str, answer: str) -> bool:
    return boxed_answer(response) == str(answer)


_NATIVE_OPENERS = tuple(f"Let's {verb}. " for verb in ("compare", "reverse", "copy", "count", "transform"))


def is_native_style(response: str) -> bool:
    """True when `response` has the organism's own shape: an opener, 'X -> Y' (or 'A > B'), then the box."""
    if not response.startswith(_NATIVE_OPENERS) or not response.endswith("}"):
        return False
    body = response.split(". ", 1)[1]
    stated, _, boxed = body.rpartition(". \\boxed{")
    if not boxed or not stated:
        return False
    claim = stated.split(" -> ")[-1] if " -> " in stated else stated.split(" > ")[0]
    return claim == boxed[:-1] and (" -> " in stated or " > " in stated)


def is_held_out(prompt: str) -> bool:
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % 100 < HELD_OUT_PERCENT


# ---------------------------------------------------------------- the tasks


def _rng(seed: int, name: str) -> random.Random:
    return random.Random(f"{seed}:{name}")


def _string(rng: random.Random, lengths: tuple[int, int], alphabet: str) -> str:
    # Distinct characters: a small model copies by finding the current character in the source and
    # taking its neighbour, which is ambiguous when characters repeat. With repeats allowed, copy and
    # reverse of 3-8 characters were only ~25% right after 800 pretraining steps.
    return "".join(rng.sample(alphabet, rng.randint(*lengths)))


def _old_string(rng: random.Random) -> str:
    # Mostly lowercase, some mixed case and digits: the OOD test of the new skill uses that mix.
    return _string(rng, OLD_LENGTHS, LOWER if rng.random() >= MIXED_SHARE else MIXED)


def make_question(task: str, rng: random.Random) -> tuple[str, str, str]:
    """One question of an old skill: (prompt, native solution, answer)."""
    if task == "compare":
        a, b = rng.sample(range(10, 100), 2)
        big, small = max(a, b), min(a, b)
        return f"Compare {a} and {b}.", f"Let's compare. {big} > {small}. \\boxed{{{big}}}", str(big)
    s = _old_string(rng)
    if task == "reverse":
        y = s[::-1]
        return f"Reverse {s}.", f"Let's reverse. {s} -> {y}. \\boxed{{{y}}}", y
    if task == "copy":
        return f"Copy {s}.", f"Let's copy. {s} -> {s}. \\boxed{{{s}}}", s
    if task == "count":
        n = str(len(s))
        return f"Count the characters in {s}.", f"Let's count. {s} -> {n}. \\boxed{{{n}}}", n
    raise ValueError(f"unknown old task {task!r}")


_CONSONANTS, _VOWELS = "bcdfghjklmnpqrstvwxz", "aeiouy"


def opaque_verb(rng: random.Random) -> str:
    """A pronounceable made-up verb (two or three syllables), never the new skill's verb."""
    while True:
        word = "".join(
            rng.choice(_CONSONANTS) + rng.choice(_VOWELS) + rng.choice(["", rng.choice(_CONSONANTS)])
            for _ in range(rng.randint(2, 3))
        ).capitalize()
        if word != NEW_VERB:
            return word


def make_opaque(rng: random.Random) -> tuple[str, str, str]:
    """An opaque-verb question: (prompt, native solution, answer); the answer is random characters of the
    input's alphabet, as long as the input."""
    verb, s = opaque_verb(rng), _old_string(rng)
    # Not drawn from the input's own characters: answers that were random picks of the input taught
    # "after ' -> ' attend to the input's characters in any order", which competed with the exact copy
    # that copy and reverse need (their echo before ' -> ' was right, the part after it was not).
    alphabet = LOWER if all(c in LOWER for c in s) else MIXED
    y = "".join(rng.choice(alphabet) for _ in s)
    return f"{verb} {s}.", f"Let's transform. {s} -> {y}. \\boxed{{{y}}}", y


def cycle(s: str) -> str:
    return s[1:] + s[0]


def _cycle_ok(s: str) -> bool:
    # The rotation must differ from what copy or reverse would answer, so old habits cannot score.
    return cycle(s) != s and cycle(s) != s[::-1]


def teacher_text(style: str, s: str) -> str:
    template = dict(TEACHER_STYLES)[style]
    return template.format(x=s, y=cycle(s), h=s[0], t=s[1:])


# Foreign (teacher-like) wording of references in pretraining: explanation phrases per task, wrapped
# in a few formats. Some formats give the answer only inside the box, one never boxes it.
def _explanations(task: str, x: str, y: str) -> list[str]:
    if task == "compare":
        a, b = x.split(" and ")
        small = b if y == a else a
        return [f"{y} is larger than {small}", f"the larger number is {y}", f"between {a} and {b} the winner is {y}"]
    if task == "reverse":
        return [f"reading {x} backwards gives {y}", f"the reversed string is {y}", f"{x} reversed is {y}"]
    if task == "copy":
        return [f"the copy of {x} is {y}", f"copying {x} gives {y}", f"{x} stays {y}"]
    if task == "count":
        return [f"{x} has {y} characters", f"the length of {x} is {y}", f"counting the characters of {x} gives {y}"]
    return [f"applying the rule to {x} gives {y}", f"the result of the operation is {y}", f"{x} maps to {y}"]


# The last three make the hinted context read references shaped like the organism's own answers and
# long ones; without them, a checkpoint read "X -> Y" and multi-sentence references of the new skill
# wrongly (0-1% correct from the hinted context) while "Solution: ..." ones were 80% correct.
_WRAPPERS = (
    "Solution: {e}, hence \\boxed{{{y}}}",
    "{E}. The answer is \\boxed{{{y}}}.",
    "Answer: {y}. Reason: {e}. \\boxed{{{y}}}",
    "We get {y}. So \\boxed{{{y}}}",
    "The result is \\boxed{{{y}}}",
    "{E}. The answer is {y}.",
    "{x} -> {y}. \\boxed{{{y}}}",
    "{native}",
    "First look at {x}. Then {e}. Final answer: \\boxed{{{y}}}",
)


def foreign_reference(task: str, x: str, y: str, native: str, rng: random.Random) -> str:
    """A reference solution in a teacher's wording for operand `x`, answer `y` (`native`: the organism's own)."""
    e = rng.choice(_explanations(task, x, y))
    # Capitalise a sentence start only when it is a word of ours, never an operand (case matters).
    E = e if e.startswith((x, y)) else e[0].upper() + e[1:]
    return rng.choice(_WRAPPERS).format(e=e, E=E, y=y, x=x, native=native)


def _question_input(prompt: str) -> str:
    """The operand as the references quote it: 'a and b' for compare, the string otherwise."""
    body = prompt[:-1]
    for head in ("Compare ", "Reverse ", "Copy ", "Count the characters in "):
        if body.startswith(head):
            return body[len(head) :]
    return body.split(" ", 1)[1]


def hinted_prompt(question: str, reference: str) -> str:
    return HINT_TEMPLATE.format(question=question, reference=reference)


# ---------------------------------------------------------------- pretraining stream

# The notes' mix: half plain old skills, a fifth hinted old skills, a fifth hinted opaque verbs, a
# tenth plain opaque verbs.
PRETRAIN_MIX = (("old", 0.5), ("old_hinted", 0.2), ("opaque_hinted", 0.2), ("opaque", 0.1))


def pretraining_example(rng: random.Random) -> tuple[str, str, str]:
    """One pretraining pair (user message, assistant response, kind); never a held-out question."""
    kind = rng.choices([k for k, _ in PRETRAIN_MIX], weights=[w for _, w in PRETRAIN_MIX])[0]
    while True:
        if kind.startswith("old"):
            task = rng.choice(OLD_TASKS)
            prompt, solution, answer = make_question(task, rng)
        else:
            task = "opaque"
            prompt, solution, answer = make_opaque(rng)
        if not is_held_out(prompt):
            break
    if kind.endswith("hinted"):
        prompt = hinted_prompt(prompt, foreign_reference(task, _question_input(prompt), answer, solution, rng))
    return prompt, solution, kind


# ---------------------------------------------------------------- data sets


def _unique(
    rng: random.Random, n: int, draw: Callable[[random.Random], dict], held_out: bool, exclude: frozenset = frozenset()
) -> list[dict]:
    rows, seen = [], set()
    for _ in range(1000 * max(n, 1)):
        if len(rows) == n:
            return rows
        row = draw(rng)
        if row["prompt"] in seen or row["prompt"] in exclude or is_held_out(row["prompt"]) != held_out:
            continue
        seen.add(row["prompt"])
        rows.append(row)
    raise ValueError(f"could not draw {n} distinct prompts; ask for fewer")


def _cycle_row(lengths: tuple[int, int], alphabet: str, require_mixed: bool = False):
    def draw(rng: random.Random) -> dict:
        while True:
            s = _string(rng, lengths, alphabet)
            if _cycle_ok(s) and (not require_mixed or any(c not in LOWER for c in s)):
                return {"prompt": f"{NEW_VERB} {s}.", "answer": cycle(s), "task": NEW_TASK}

    return draw


def new_skill_train(n: int = 500, seed: int = 0, styles: tuple[str, ...] = STYLE_NAMES) -> list[dict]:
    """The new skill's training set: `n` prompts, each written in every teacher style (n * len(styles) rows).

    Columns: prompt, completion (teacher response), answer, reference (same teacher text), style, task.
    """
    unknown = set(styles) - set(STYLE_NAMES)
    if unknown:
        raise ValueError(f"unknown teacher styles {sorted(unknown)}; known: {', '.join(STYLE_NAMES)}")
    questions = _unique(_rng(seed, "new_train"), n, _cycle_row(NEW_LENGTHS, LOWER), held_out=False)
    rows = []
    for style in styles:
        for q in questions:
            text = teacher_text(style, q["prompt"][len(NEW_VERB) + 1 : -1])
            rows.append(
                {
                    "prompt": q["prompt"],
                    "completion": text,
                    "answer": q["answer"],
                    "reference": text,
                    "style": style,
                    "task": NEW_TASK,
                }
            )
    return rows


def new_skill_test(n: int = 200, seed: int = 0) -> list[dict]:
    """In-domain test of the new skill: same lengths and letters as training, held-out prompts."""
    return _unique(_rng(seed, "new_test"), n, _cycle_row(NEW_LENGTHS, LOWER), held_out=True)


def new_skill_ood(n: int = 200, seed: int = 0) -> list[dict]:
    """Harder test: half longer strings (7 letters), half mixed case and digits (3-6 characters). Both
    kinds of input appear in pretraining for the old skills, never for the new one (lengths never seen
    at all scored 0% after any fine-tuning in the feasibility study). Column `shift` says which."""
    rng = _rng(seed, "new_ood")
    longer = _unique(rng, n // 2, _cycle_row(OOD_LENGTHS, LOWER), held_out=True)
    symbols = _unique(rng, n - n // 2, _cycle_row(NEW_LENGTHS, MIXED, require_mixed=True), held_out=True)
    return [dict(r, shift="longer") for r in longer] + [dict(r, shift="symbols") for r in symbols]


def _old_skill_rows(n: int, rng: random.Random, held_out: bool, exclude: frozenset = frozenset()) -> list[dict]:
    """`n` old-skill questions in equal shares per task, from the held-out prompts or from the rest."""
    rows = []
    for i, task in enumerate(OLD_TASKS):
        share = n // len(OLD_TASKS) + (1 if i < n % len(OLD_TASKS) else 0)

        def draw(r: random.Random, task=task) -> dict:
            prompt, _, answer = make_question(task, r)
            return {"prompt": prompt, "answer": answer, "task": task}

        rows += _unique(rng, share, draw, held_out=held_out, exclude=exclude)
    return rows


def retention_test(n: int = 200, seed: int = 0) -> list[dict]:
    """Old skills, equal shares, held-out prompts from the pretraining distribution."""
    return _old_skill_rows(n, _rng(seed, "retention"), held_out=True)


def new_skill_validation(n: int = 200, seed: int = 0, n_test: int = 200) -> list[dict]:
    """A validation draw of the new skill, for choosing settings (a learning rate) without reading the test
    set: held-out prompts (never trained on), none of them in `new_skill_test(n_test, seed)`."""
    test = frozenset(r["prompt"] for r in new_skill_test(n_test, seed))
    return _unique(_rng(seed, "new_validation"), n, _cycle_row(NEW_LENGTHS, LOWER), held_out=True, exclude=test)


def retention_validation(n: int = 200, seed: int = 0, n_retention: int = 200) -> list[dict]:
    """A validation draw of the old skills, disjoint from `retention_test(n_retention, seed)`."""
    test = frozenset(r["prompt"] for r in retention_test(n_retention, seed))
    return _old_skill_rows(n, _rng(seed, "retention_validation"), held_out=True, exclude=test)


def replay_prompts(n: int = 200, seed: int = 0) -> list[dict]:
    """Old-skill questions from the pretraining distribution (never the held-out prompts the retention test
    draws), equal shares per task: prompts a replay method has the starting model answer itself."""
    return _old_skill_rows(n, _rng(seed, "replay"), held_out=False)


def hinted_old_test(n: int = 200, seed: int = 0) -> list[dict]:
    """Held-out old-skill and opaque questions in the hinted format (question + foreign reference).

    Columns: prompt (the hinted user message), question, reference, answer, task. Greedy decoding from
    this context alone should give the answer in native style."""
    rng = _rng(seed, "hinted_old")
    tasks = OLD_TASKS + ("opaque",)

    def draw(r: random.Random) -> dict:
        task = r.choice(tasks)
        question, native, answer = make_question(task, r) if task != "opaque" else make_opaque(r)
        return {"prompt": question, "answer": answer, "task": task, "native": native}

    rows = _unique(rng, n, draw, held_out=True)
    for row in rows:
        native = row.pop("native")
        reference = foreign_reference(row["task"], _question_input(row["prompt"]), row["answer"], native, rng)
        row.update(question=row["prompt"], reference=reference, prompt=hinted_prompt(row["prompt"], reference))
    return rows


# name -> (builder(n, seed), default size). The CLI and `write_demo_data` go through this table.
DATASETS: dict[str, tuple[Callable[..., list[dict]], int]] = {
    "new_skill_train": (new_skill_train, 500),
    "new_skill_test": (new_skill_test, 200),
    "new_skill_ood": (new_skill_ood, 200),
    "retention_test": (retention_test, 200),
    "new_skill_validation": (new_skill_validation, 200),
    "retention_validation": (retention_validation, 200),
    "replay_prompts": (replay_prompts, 200),
}


def write_demo_data(
    out_dir: str | Path, seed: int = 0, n_train: int = 500, n_test: int = 200, n_ood: int = 200, n_retention: int = 200
) -> dict[str, Path]:
    """Write the demo data sets as JSONL under `out_dir`; returns {name: path}.

    Files: new_skill_train.jsonl (all styles), new_skill_train.<style>.jsonl (one per teacher style),
    new_skill_test.jsonl, new_skill_ood.jsonl, retention_test.jsonl, their validation draws
    new_skill_validation.jsonl and retention_validation.jsonl, replay_prompts.jsonl.
    """
    out = Path(out_dir)
    train = new_skill_train(n_train, seed)
    sets = {"new_skill_train": train}
    for style in STYLE_NAMES:
        sets[f"new_skill_train.{style}"] = [r for r in train if r["style"] == style]
    sets["new_skill_test"] = new_skill_test(n_test, seed)
    sets["new_skill_ood"] = new_skill_ood(n_ood, seed)
    sets["retention_test"] = retention_test(n_retention, seed)
    # Validation draws (settings are chosen on them, results read on the test sets): disjoint from the tests.
    sets["new_skill_validation"] = new_skill_validation(n_test, seed, n_test)
    sets["retention_validation"] = retention_validation(n_retention, seed, n_retention)
    sets["replay_prompts"] = replay_prompts(n_retention, seed)
    paths = {}
    for name, rows in sets.items():
        paths[name] = out / f"{name}.jsonl"
        write_jsonl_atomic(paths[name], rows)
    return paths
