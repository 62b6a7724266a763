"""Best-of-n rewriting: several candidates per prompt, each judged, one (or all) kept by a stated rule.

For a prompt the model fails on its own, hinted decoding writes `--samples_per_prompt` N candidates, candidate
s at beta `--beta_ladder`[s mod its length] (default: `--beta` for all). Candidate s of the row with input
index i samples from the random stream fixed by (--seed, i, s) alone, so the first n candidates are the same
for every N >= n, whatever the chunking or batching: the share of prompts with a kept candidate can only grow
with N. Each candidate is judged (`judge`): verified against the answer, ended by itself (not cut by the
token limit or a repetition loop, unless --keep_truncated) and, with `--step_check drop`, free of false
steps. Among the usable ones `choose` keeps, by `--keep`:
  best   the one with the highest Z, the DDT standardised centred log-likelihood of the response under the
         plain context (`onsft.formulas.ddt`, scored by the streamed scorer): the closest to the model's own
         distribution; ties go to the lower sample index;
  first  the first one (later candidates are decoded but not judged);
  all    every distinct one (one training row each).
The model's own samples are judged the same way (beta None); the first usable one is kept as it is.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from onsft.data.step_check import StepChecker, StepReport
from onsft.data.verify import Verdict, Verifier
from onsft.engine.decoding import Generation
from onsft.engine.hinted import HintedConfig, hinted_decode
from onsft.errors import UserError

KEEP_RULES = ("best", "first", "all")
# Finish reasons of a response the model ended itself; the others (the token limit, a repetition loop) were
# cut by the decoder: not a finished solution, and training on it with the chat template's end of turn
# appended would teach an ending the model did not choose.
ENDED = ("eos", "stop")
# Random streams per row: sample s of the row with input index i draws from stream i * SAMPLE_SLOTS + s.
SAMPLE_SLOTS = 2**20


@dataclass
class BestOfNConfig:
    """How many hinted-decoding candidates a failed prompt gets, at which betas, and which are kept."""

    samples_per_prompt: int = field(
        default=1,
        metadata={
            "help": "N: hinted-decoding candidates per prompt the model fails on its own, each verified; "
            "the first n are the same for any N >= n."
        },
    )
    beta_ladder: str = field(
        default="",
        metadata={
            "help": "Betas of the candidates, comma-separated, cycled: candidate s uses the (s mod length)-th "
            "(e.g. 0.5,1,2). Default: --hint_beta for every candidate."
        },
    )
    keep: Literal["best", "first", "all"] = field(
        default="best",
        metadata={
            "help": "Among a prompt's usable candidates: best = the highest Z (DDT, closest to the model's own "
            "distribution), first = the first, all = every distinct one (a training row each)."
        },
    )

    def betas(self) -> list[float]:
        """The ladder as numbers ([] = none); a bad entry is a UserError."""
        values = []
        for item in filter(None, (part.strip() for part in self.beta_ladder.split(","))):
            try:
                value = float(item)
            except ValueError:
                value = math.nan
            if not math.isfinite(value) or value < 0:
                raise UserError(
                    f"`beta_ladder` entry `{item}` is not a finite number >= 0",
                    where="config",
                    fix="pass comma-separated betas, e.g. --beta_ladder 0.5,1,2.",
                )
            values.append(value)
        if self.beta_ladder.strip() and not values:
            raise UserError("`beta_ladder` holds no beta", where="config", fix="pass e.g. --beta_ladder 0.5,1,2.")
        return values

    def validate(self) -> None:
        if not 1 <= self.samples_per_prompt < SAMPLE_SLOTS:
            raise UserError(
                f"`samples_per_prompt` must be >= 1 and < {SAMPLE_SLOTS}", where="config", fix="pass 1 or more."
            )
        if self.keep not in KEEP_RULES:
            raise UserError(f"unknown keep `{self.keep}`", where="config", fix=f"use one of {', '.join(KEEP_RULES)}.")
        self.betas()


def candidate_betas(config: BestOfNConfig, beta: float) -> list[float]:
    """The beta of each candidate s = 0..N-1."""
    ladder = config.betas() or [beta]
    return [ladder[s % len(ladder)] for s in range(config.samples_per_prompt)]


def sample_id(index: int, sample: int) -> int:
    """The random stream of sample `sample` of the row with input index `index` (see SAMPLE_SLOTS)."""
    return index * SAMPLE_SLOTS + sample


@dataclass
class Candidate:
    """One sampled response to a prompt and how it was judged. `beta` is None for the model's own samples.
    `problem`: None when usable, else why not ("not verified", "truncated", "false step"); "unjudged" until
    `judge` ran. `score`: the scorer's dict (mean_phi, z, p_value, n_tokens) once scored."""

    sample: int
    beta: float | None
    generation: Generation
    verdict: Verdict | None = None
    steps: StepReport | None = None
    problem: str | None = "unjudged"
    score: dict | None = None

    @property
    def usable(self) -> bool:
        return self.problem is None

    @property
    def text(self) -> str:
        return self.generation.text


def judge(
    candidate: Candidate,
    answer: str,
    verifier: Verifier,
    step_checker: StepChecker | None,
    keep_truncated: bool,
    drop_false_steps: bool,
) -> None:
    """Verify the candidate, check its steps (when a checker is on) and say whether it may be kept."""
    candidate.verdict = verifier.check(candidate.text, answer)
    candidate.steps = step_checker(candidate.text) if step_checker is not None else None
    if not candidate.verdict.correct:
        candidate.problem = "not verified"
    elif not keep_truncated and candidate.generation.finish_reason not in ENDED:
        candidate.problem = "truncated"
    elif drop_false_steps and candidate.steps is not None and candidate.steps.false:
        candidate.problem = "false step"
    else:
        candidate.problem = None


def judge_all(candidates: Sequence[Candidate], first_only: bool, judge_one: Callable[[Candidate], None]) -> None:
    """Judge in sample order; with `first_only`, stop after the first usable candidate."""
    for candidate in candidates:
        judge_one(candidate)
        if first_only and candidate.usable:
            return


def to_score(candidates: Sequence[Candidate], keep: str) -> list[Candidate]:
    """The candidates `choose` needs scores of: the usable ones (for "first" only the first; for "all" one per
    distinct text)."""
    usable = [c for c in candidates if c.usable]
    return usable[:1] if keep == "first" else distinct(usable) if keep == "all" else usable


def distinct(candidates: Sequence[Candidate]) -> list[Candidate]:
    """The first candidate of each distinct text, in order."""
    seen: set[str] = set()
    out = []
    for candidate in candidates:
        if candidate.text not in seen:
            seen.add(candidate.text)
            out.append(candidate)
    return out


def _z(candidate: Candidate) -> float:
    z = (candidate.score or {}).get("z")
    return z if z is not None and math.isfinite(z) else -math.inf


def choose(candidates: Sequence[Candidate], keep: str) -> list[Candidate]:
    """The kept candidates, in the order their rows are written: best = [the usable one with the highest Z,
    ties to the lower sample], first = [the first usable], all = the distinct usable ones in sample order.
    Empty when none is usable."""
    usable = [c for c in candidates if c.usable]
    if not usable:
        return []
    if keep == "first":
        return usable[:1]
    if keep == "all":
        return distinct(usable)
    return [max(usable, key=lambda c: (_z(c), -c.sample))]


FAILURES = ("not verified", "truncated", "false step")  # least to most promising


def shown(candidates: Sequence[Candidate]) -> Candidate | None:
    """The candidate a dropped row shows: the one that got furthest (a verified one over an unverified one),
    the last judged among equals."""
    judged = [c for c in candidates if c.problem in FAILURES]
    if not judged:
        return None
    return max(reversed(judged), key=lambda c: FAILURES.index(c.problem))


def provenance(candidate: Candidate, kept: bool) -> dict:
    """What records.jsonl says of one hinted candidate (`candidates`)."""
    generation = candidate.generation
    entry = {
        "sample": candidate.sample,
        "beta": candidate.beta,
        "finish_reason": generation.finish_reason,
        "n_tokens": generation.n_tokens,
        "handed_over": bool(getattr(generation, "handed_over", False)),
        "verified": None if candidate.verdict is None else candidate.verdict.correct,
        "usable": candidate.usable,
        "problem": None if candidate.problem == "unjudged" else candidate.problem,
        "kept": kept,
    }
    if candidate.score is not None:
        entry.update(mean_phi=candidate.score["mean_phi"], z=candidate.score["z"])
    return entry


def decode_candidates(
    model,
    tokenizer,
    plain_ids: Sequence[list[int]],
    hinted_ids: Sequence[list[int]],
    indices: Sequence[int],
    config: HintedConfig,
    betas: Sequence[float],
) -> list[list[Candidate]]:
    """Candidates s = 0..len(betas)-1 of every row (row r has input index indices[r]), by hinted decoding at
    betas[s], seeded by (config.seed, indices[r], s); one decoding call per distinct beta."""
    out: list[list[Candidate | None]] = [[None] * len(betas) for _ in plain_ids]
    for beta in dict.fromkeys(betas):
        jobs = [(r, s) for s, b in enumerate(betas) if b == beta for r in range(len(plain_ids))]
        outputs = hinted_decode(
            model,
            tokenizer,
            [plain_ids[r] for r, _ in jobs],
            [hinted_ids[r] for r, _ in jobs],
            dataclasses.replace(config, beta=beta),
            example_ids=[sample_id(indices[r], s) for r, s in jobs],
        )
        for (r, s), output in zip(jobs, outputs):
            out[r][s] = Candidate(s, beta, output)
    return out  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------ summary


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def yield_by_samples(records: Sequence[dict]) -> dict:
    """Of the prompts that got hinted candidates, the share with a usable one among their first n, n = 1..N.
    Non-decreasing in n by construction; candidate n of a run with N >= n is candidate n of any other."""
    attempted = [r["candidates"] for r in records if r.get("candidates")]
    n = max((len(c) for c in attempted), default=0)
    firsts = [min((e["sample"] for e in c if e["usable"]), default=None) for c in attempted]
    by_n = []
    for m in range(1, n + 1):
        hits = sum(first is not None and first < m for first in firsts)
        by_n.append({"samples": m, "prompts_with_a_usable_candidate": hits, "share": _share(hits, len(attempted))})
    return {"prompts": len(attempted), "by_samples": by_n}


def handover(records: Sequence[dict]) -> dict:
    """How many hinted candidates (and kept rewrites) reached the answer marker, i.e. handed over to the plain
    context (see `onsft.engine.hinted`)."""
    candidates = [e for r in records for e in r.get("candidates") or []]
    kept = [e for e in candidates if e["kept"]]
    reached, kept_reached = sum(e["handed_over"] for e in candidates), sum(e["handed_over"] for e in kept)
    cut = sum(e.get("finish_reason") == "length" and not e["handed_over"] for e in candidates)
    return {
        "candidates": len(candidates),
        "handed_over": reached,
        "share": _share(reached, len(candidates)),
        # Cut at the token limit before any marker: with marker_before_stop, the ones that never found one.
        "cut_before_marker": cut,
        "cut_share": _share(cut, len(candidates)),
        "kept": len(kept),
        "kept_handed_over": kept_reached,
        "kept_share": _share(kept_reached, len(kept)),
    }


def by_beta(records: Sequence[dict]) -> dict:
    """Per beta of the ladder: candidates decoded, judged, usable, handed over."""
    table: dict[str, dict] = {}
    for entry in (e for r in records for e in r.get("candidates") or []):
        row = table.setdefault(str(entry["beta"]), {"candidates": 0, "judged": 0, "usable": 0, "handed_over": 0})
        row["candidates"] += 1
        row["judged"] += entry["verified"] is not None
        row["usable"] += entry["usable"]
        row["handed_over"] += entry["handed_over"]
    return dict(sorted(table.items(), key=lambda item: float(item[0])))
