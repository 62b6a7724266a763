"""The rewrite pipeline: own samples first, hinted decoding where the model fails, verification, DDT scores.

For every chunk of prompts (`Rewriter.chunk`): sample `own_samples` answers from the plain context and
keep the first usable one as it is (provenance `own`); otherwise decode `samples_per_prompt` hinted
candidates (`onsft.pipeline.rewrite.best_of_n`) and keep the best, first or all usable ones (`hinted`), else
`dropped`; then score the responses and the original reference under the plain context. Every sample is
seeded by (seed, stage, its row's input index, its sample index), so a row samples the same whenever and
wherever it runs, in any chunk.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from onsft.data.chat import encode_prompt, encode_response
from onsft.data.rows import Example
from onsft.data.step_check import StepChecker, StepReport
from onsft.data.verify import Verifier, get_verifier
from onsft.engine.decoding import SamplingConfig, generate
from onsft.engine.hinted import DEFAULT_BETA, HintedConfig
from onsft.engine.scoring import Item, ScoringConfig
from onsft.errors import UserError
from onsft.pipeline.rewrite.best_of_n import (
    ENDED,
    Candidate,
    candidate_betas,
    choose,
    decode_candidates,
    judge,
    judge_all,
    provenance,
    sample_id,
    shown,
    to_score,
)
from onsft.pipeline.rewrite.hint_profiles import model_profile
from onsft.pipeline.rewrite.hint_prompts import HintSettings, hinted_messages
from onsft.pipeline.rewrite.rewrite_config import RewriteConfig, check_columns
from onsft.runtime.device import stream_seed
from onsft.runtime.models import context_length, pad_token_id


@dataclass
class Prepared:
    """One input row with its token contexts."""

    example: Example
    plain_ids: list[int]
    hinted_ids: list[int]


def prepare(
    tokenizer, examples: Sequence[Example], hint: HintSettings, max_length: int, context: int | None, where: str
) -> list[Prepared]:
    """Tokenise both contexts of every row; prompts that leave no room for a response are errors."""
    rows, too_long = [], []
    for example in examples:
        plain = encode_prompt(tokenizer, example.prompt, where)
        hinted = encode_prompt(tokenizer, hinted_messages(example.prompt, example.reference or "", hint), where)
        limit = min(max_length, context) if context else max_length
        if len(plain) >= limit or (context and len(hinted) >= context):
            too_long.append((example, len(plain), len(hinted)))
        rows.append(Prepared(example, plain, hinted))
    if too_long:
        example, plain, hinted = too_long[0]
        raise UserError(
            f"{len(too_long)} row(s) leave no room for a response (first: plain prompt {plain}, hinted "
            f"prompt {hinted} tokens; max_length {max_length}, model context {context})",
            where=where,
            line=example.line,
            fix="shorten those prompts/references, raise --max_length, or drop the rows.",
        )
    return rows


@dataclass
class RowState:
    """What one row's chunk step found: its own samples, its hinted candidates, the tokens decoded."""

    own: list[Candidate] = field(default_factory=list)
    hinted: list[Candidate] = field(default_factory=list)
    generated_tokens: int = 0
    analysis: str | None = None
    drop_reason: str | None = None  # a failed analysis
    reference_score: dict | None = None

    @property
    def own_kept(self) -> Candidate | None:
        return next((c for c in self.own if c.usable), None)


class Rewriter:
    """The model, tokenizer, settings, verifier, step checker and scorer that rewrite chunks of prepared rows."""

    def __init__(
        self,
        model,
        tokenizer,
        config: RewriteConfig,
        hinted: HintedConfig,
        scoring: ScoringConfig,
        hint: HintSettings,
        verifier: Verifier,
        step_checker: StepChecker | None = None,
    ):
        self.model, self.tokenizer, self.config, self.hint, self.verifier = model, tokenizer, config, hint, verifier
        self.step_checker = step_checker
        self.hinted = dataclasses.replace(
            hinted, answer_marker=hint.answer_marker, beta=hint.beta, marker_before_stop=hint.marker_before_stop
        )
        self.betas = candidate_betas(config, DEFAULT_BETA if hint.beta is None else hint.beta)
        self.context = context_length(model)
        self.scorer = scoring.scorer(model, pad_token_id(tokenizer))
        self.generated = 0  # tokens decoded by this object (throughput)

    def own_sampling(self) -> SamplingConfig:
        """The own samples' settings: hinted decoding's token limit, the own temperature."""
        return SamplingConfig(
            max_new_tokens=self.hinted.max_new_tokens,
            temperature=self.config.own_temperature,
            top_p=self.config.own_top_p,
            seed=stream_seed("rewrite", "own", self.hinted.seed, 0),
            batch_size=self.config.own_batch_size,
        )

    def judge(self, candidate: Candidate, answer: str) -> None:
        config = self.config
        judge(candidate, answer, self.verifier, self.step_checker, config.keep_truncated, config.step_check == "drop")

    def chunk(self, rows: Sequence[Prepared], progress: Callable[[int], None] | None = None) -> list[dict]:
        """Records (input fields + results, keyed by `_index`) for consecutive rows. Every sample is seeded by
        (seed, its row's input index, its sample index), so a row samples the same in any chunk."""
        config, k = self.config, self.config.own_samples
        states = [RowState() for _ in rows]
        if k:
            prompts = [row.plain_ids for row in rows for _ in range(k)]
            ids = [sample_id(row.example.index, t) for row in rows for t in range(k)]
            samples = generate(self.model, self.tokenizer, prompts, self.own_sampling(), example_ids=ids)
            for j, (row, state) in enumerate(zip(rows, states)):
                state.own = [Candidate(t, None, sample) for t, sample in enumerate(samples[j * k : (j + 1) * k])]
                for candidate in state.own:  # all of them: own_correct counts the verified ones
                    self.judge(candidate, row.example.answer)
                state.generated_tokens += sum(c.generation.n_tokens for c in state.own)
        rewrite = [j for j, state in enumerate(states) if not (config.keep_own and state.own_kept)]
        if progress is not None:
            progress(len(rows) - len(rewrite))
        hinted_ids = {j: rows[j].hinted_ids for j in rewrite}
        pending = len(rewrite)
        if config.analyze_first and rewrite:
            rewrite = self._analyze(rows, rewrite, states, hinted_ids)
        if rewrite:
            decoded = decode_candidates(
                self.model,
                self.tokenizer,
                [rows[j].plain_ids for j in rewrite],
                [hinted_ids[j] for j in rewrite],
                [rows[j].example.index for j in rewrite],
                self.hinted,
                self.betas,
            )
            for j, candidates in zip(rewrite, decoded):
                states[j].hinted = candidates
                states[j].generated_tokens += sum(c.generation.n_tokens for c in candidates)
                judge_all(candidates, config.keep == "first", lambda c, a=rows[j].example.answer: self.judge(c, a))
        if progress is not None and pending:
            progress(pending)
        self._score(rows, states)
        records = [self._record(row, state) for row, state in zip(rows, states)]
        self.generated += sum(state.generated_tokens for state in states)
        return records

    def _analyze(self, rows, rewrite: list[int], states, hinted_ids: dict[int, list[int]]) -> list[int]:
        """Greedy analysis from the hinted context up to the first marker; it joins the hinted context.
        Returns the rows that reached the marker; the others are marked dropped."""
        config = self.config
        greedy = SamplingConfig(
            max_new_tokens=config.analyze_max_new_tokens, temperature=0.0, batch_size=self.hinted.batch_size
        )
        outputs = generate(self.model, self.tokenizer, [hinted_ids[j] for j in rewrite], greedy)
        kept = []
        for j, output in zip(rewrite, outputs):
            states[j].generated_tokens += output.n_tokens
            cut = marker_prefix(self.tokenizer, output.token_ids, config.analyze_marker)
            states[j].analysis = self.tokenizer.decode(
                output.token_ids[: cut or len(output.token_ids)], skip_special_tokens=True
            )
            if cut is None or (self.context and len(hinted_ids[j]) + cut >= self.context):
                states[j].drop_reason = "no analysis marker" if cut is None else "analysis fills the context"
                continue
            hinted_ids[j] = hinted_ids[j] + output.token_ids[:cut]
            kept.append(j)
        return kept

    def _kept(self, state: RowState) -> tuple[str, list[Candidate]]:
        """The row's provenance and kept candidates (scored already)."""
        if self.config.keep_own and state.own_kept is not None:
            return "own", [state.own_kept]
        kept = choose(state.hinted, self.config.keep)
        return ("hinted" if kept else "dropped"), kept

    def _record(self, row: Prepared, state: RowState) -> dict:
        config = self.config
        provenance_, kept = self._kept(state)
        # A dropped row shows its most promising try (not trained on).
        main = kept[0] if kept else shown(state.hinted)
        response, verdict = (main.generation, main.verdict) if main is not None else (None, None)
        score = (main.score if main is not None else None) or {}
        hinted = provenance_ != "own" and main is not None
        steps = self._steps(main)
        record = {**row.example.record, "_index": row.example.index}
        record.update(
            response=response.text if response is not None else None,
            provenance=provenance_,
            verified=bool(verdict is not None and verdict.correct),
            mean_phi=score.get("mean_phi"),
            z=score.get("z"),
            p_value=score.get("p_value"),
            scored_tokens=score.get("n_tokens"),
            finish_reason=response.finish_reason if response is not None else None,
            n_tokens=response.n_tokens if response is not None else 0,
            reference_mean_phi=(state.reference_score or {}).get("mean_phi"),
            reference_z=(state.reference_score or {}).get("z"),
            own_correct=sum(c.verdict.correct for c in state.own),
            own_samples=config.own_samples,
            hinted_tries=sum(c.verdict is not None for c in state.hinted),
            sample_index=main.sample if main is not None else None,
            beta=main.beta if main is not None else None,
            mean_lambda=response.mean_lambda if hinted else None,
            handed_over=response.handed_over if hinted else None,
            extracted_answer=verdict.extracted if verdict is not None else None,
            verify_method=verdict.method if verdict is not None else None,
            generated_tokens=state.generated_tokens,
            # The response did not end by itself (the token limit or a repetition loop; see finish_reason).
            truncated=response is not None and response.finish_reason not in ENDED,
            score_truncated=bool(score.get("truncated", False)),
            false_steps=steps.false if steps is not None else None,
            steps_checked=steps.checked if steps is not None else None,
            candidates=[provenance(c, any(c is k for k in kept)) for c in state.hinted] or None,
            also_kept=[self._also(c) for c in kept[1:]],
        )
        if config.analyze_first:
            record["analysis"] = state.analysis
        if provenance_ == "dropped":
            record["drop_reason"] = state.drop_reason or (main.problem if main is not None else "not verified")
        return record

    def _steps(self, candidate: Candidate | None) -> StepReport | None:
        """The step check of a response (None when off); a candidate never judged (a dropped row's) is checked now."""
        if candidate is None or self.step_checker is None:
            return None
        if candidate.steps is None:
            candidate.steps = self.step_checker(candidate.text)
        return candidate.steps

    def _also(self, candidate: Candidate) -> dict:
        """Another kept candidate of the row (--keep all): its response, provenance and scores."""
        steps = self._steps(candidate)
        return {
            "response": candidate.text,
            "sample_index": candidate.sample,
            "beta": candidate.beta,
            "mean_phi": (candidate.score or {}).get("mean_phi"),  # None: an empty response is never scored
            "z": (candidate.score or {}).get("z"),
            "finish_reason": candidate.generation.finish_reason,
            "false_steps": steps.false if steps is not None else None,
        }

    def _score(self, rows: Sequence[Prepared], states: Sequence[RowState]) -> None:
        """mean phi, Z, p under the plain context of every candidate a record may show or keep, and of every
        reference, in one pass of the streamed scorer (`Candidate.score`, `RowState.reference_score`)."""
        items, targets = [], []
        limit = min(self.config.max_length, self.context) if self.context else self.config.max_length
        for row, state in zip(rows, states):
            if self.config.keep_own and state.own_kept is not None:
                wanted = [state.own_kept]
            else:
                wanted = to_score(state.hinted, self.config.keep) or [c for c in [shown(state.hinted)] if c]
            texts = [(c.text, c) for c in wanted] + [(row.example.reference, state)]
            for text, target in texts:
                if text is None:
                    continue
                response = encode_response(self.tokenizer, row.example.prompt, text, row.plain_ids)
                if not response:
                    continue
                room = limit - len(row.plain_ids)
                truncated = len(response) > room
                items.append(Item(len(items), row.plain_ids + response[:room], len(row.plain_ids), truncated))
                targets.append(target)
        for batch, scores, _ in self.scorer.iter_scored(items):
            for i, score in zip(batch, scores):
                score = {**score, "truncated": items[i].truncated}
                if isinstance(targets[i], RowState):
                    targets[i].reference_score = score
                else:
                    targets[i].score = score


def marker_prefix(tokenizer, token_ids: list[int], marker: str) -> int | None:
    """The fewest leading tokens whose text contains `marker` (None when the whole output does not)."""
    if marker not in tokenizer.decode(token_ids, skip_special_tokens=True):
        return None
    low, high = 1, len(token_ids)
    while low < high:  # decoding a longer prefix only appends text, so "contains" is monotone
        middle = (low + high) // 2
        if marker in tokenizer.decode(token_ids[:middle], skip_special_tokens=True):
            high = middle
        else:
            low = middle + 1
    return low


def chunks(n: int, size: int) -> list[range]:
    return [range(start, min(n, start + size)) for start in range(0, n, size)]


def rewrite_examples(
    model,
    tokenizer,
    examples: Sequence[Example],
    config: RewriteConfig | None = None,
    hinted: HintedConfig | None = None,
    *,
    scoring: ScoringConfig | None = None,
    verifier: Verifier | str | Callable | None = None,
    hint: HintSettings | None = None,
    info: dict | None = None,
) -> list[dict]:
    """In-memory rewrite (tests, notebooks): one record per example, in order, as records.jsonl holds them.
    `verifier`: a Verifier, spec or callable (default "math"); `hint`: default resolved from `info` (a
    model's onsft.json contents; default {} = the generic template, or the model family's rewrite profile).
    Writes nothing."""
    config = config or RewriteConfig(data="in-memory")
    hinted = hinted or HintedConfig()
    config.validate()
    hinted.validate()
    check_columns(examples, "examples")
    profile = model_profile(getattr(model, "name_or_path", ""), getattr(model, "config", None), tokenizer)
    hint = hint or config.hint(hinted, info or {}, profile)
    verifier = get_verifier(verifier or "math")
    step_checker = config.build_step_checker()
    prepared = prepare(tokenizer, examples, hint, config.max_length, context_length(model), "examples")
    rewriter = Rewriter(model, tokenizer, config, hinted, scoring or ScoringConfig(), hint, verifier, step_checker)
    records: list[dict] = []
    for span in chunks(len(prepared), config.chunk_size):
        records += rewriter.chunk([prepared[i] for i in span])
    return [{k: v for k, v in r.items() if k != "_index"} for r in records]
