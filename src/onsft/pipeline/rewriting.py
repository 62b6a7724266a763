"""The rewrite pipeline: own samples first, hinted decoding where the model fails, verification, DDT scores.

For every chunk of prompts (`Rewriter.chunk`): sample `own_samples` answers from the plain context and
keep a verified one as it is (provenance `own`); otherwise run hinted decoding (`onsft.engine.hinted`)
and keep the first verified try (`hinted`), else `dropped`; then score every response and the original
reference under the plain context. All sampling of a chunk is seeded by (seed, stage, the chunk's first
row), so a chunk gives the same records whenever and wherever it runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from onsft.data.chat import encode_prompt, encode_response
from onsft.data.rows import Example
from onsft.data.step_check import StepChecker
from onsft.data.verify import Verifier, get_verifier
from onsft.engine.decoding import SamplingConfig, generate
from onsft.engine.hinted import HintedConfig, hinted_decode
from onsft.engine.scoring import Item, ScoringConfig
from onsft.errors import UserError
from onsft.pipeline.hints import HintSettings, hinted_messages, resolve_hint
from onsft.pipeline.rewrite_config import ENDED, RewriteConfig, check_columns
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


class Rewriter:
    """The model, tokenizer, settings, verifier and scorer that rewrite chunks of prepared rows."""

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
        self.hinted = dataclasses.replace(hinted, answer_marker=hint.answer_marker)
        self.context = context_length(model)
        self.scorer = scoring.scorer(model, pad_token_id(tokenizer))
        self.generated = 0  # tokens decoded by this object (throughput)

    def own_sampling(self, seed: int) -> SamplingConfig:
        """The own samples' settings: hinted decoding's token limit and stop rules, the own temperature."""
        return SamplingConfig(
            max_new_tokens=self.hinted.max_new_tokens,
            temperature=self.config.own_temperature,
            top_p=self.config.own_top_p,
            seed=seed,
            batch_size=self.config.own_batch_size,
        )

    def chunk(self, rows: Sequence[Prepared], progress: Callable[[int], None] | None = None) -> list[dict]:
        """Records (input fields + results, keyed by `_index`) for consecutive rows; deterministic given rows."""
        config, k, start = self.config, self.config.own_samples, rows[0].example.index
        states = [{"own_correct": 0, "generated_tokens": 0, "own": None} for _ in rows]
        if k:
            prompts = [row.plain_ids for row in rows for _ in range(k)]
            sampling = self.own_sampling(stream_seed("rewrite", "own", self.hinted.seed, start))
            samples = generate(self.model, self.tokenizer, prompts, sampling)
            for slot, sample in enumerate(samples):
                state, row = states[slot // k], rows[slot // k]
                verdict = self.verifier.check(sample.text, row.example.answer)
                state["generated_tokens"] += sample.n_tokens
                if verdict.correct:
                    state["own_correct"] += 1
                    if state["own"] is None and self.usable(sample) and self.sound(sample):
                        state["own"] = (sample, verdict)
        rewrite = [j for j, state in enumerate(states) if not (config.keep_own and state["own"])]
        if progress is not None:
            progress(len(rows) - len(rewrite))
        hinted_ids = {j: rows[j].hinted_ids for j in rewrite}
        pending = len(rewrite)
        if config.analyze_first and rewrite:
            rewrite = self._analyze(rows, rewrite, states, hinted_ids)
        if rewrite:
            tries = config.samples_per_prompt
            plain = [rows[j].plain_ids for j in rewrite for _ in range(tries)]
            hinted = [hinted_ids[j] for j in rewrite for _ in range(tries)]
            hd = dataclasses.replace(self.hinted, seed=stream_seed("rewrite", "hinted", self.hinted.seed, start))
            outputs = hinted_decode(self.model, self.tokenizer, plain, hinted, hd)
            for slot, j in enumerate(rewrite):
                chosen, looked = None, 0
                for output in outputs[slot * tries : (slot + 1) * tries]:
                    states[j]["generated_tokens"] += output.n_tokens
                    if chosen is not None and chosen[1].correct and self.keepable(chosen[0]):
                        continue
                    verdict = self.verifier.check(output.text, rows[j].example.answer)
                    looked += 1
                    # The first verified, finished try wins; without one a verified try that was cut is
                    # shown (dropped, "truncated"), else the last try ("not verified").
                    if chosen is None or verdict.correct or not chosen[1].correct:
                        chosen = (output, verdict)
                if chosen[1].correct and not self.usable(chosen[0]):
                    states[j]["drop_reason"] = "truncated"
                elif chosen[1].correct and not self.sound(chosen[0]):
                    states[j]["drop_reason"] = "false step"
                states[j]["hinted"] = (*chosen, looked)
        if progress is not None and pending:
            progress(pending)
        records = [self._record(row, state) for row, state in zip(rows, states)]
        self.generated += sum(state["generated_tokens"] for state in states)
        self._score(rows, records)
        return records

    def usable(self, generation) -> bool:
        """A verified response is kept only when the model ended it (or --keep_truncated)."""
        return self.config.keep_truncated or generation.finish_reason in ENDED

    def sound(self, generation) -> bool:
        """With --step_check drop, a response stating a false step is not kept either."""
        return self.config.step_check != "drop" or not self.step_checker(generation.text).false

    def keepable(self, generation) -> bool:
        return self.usable(generation) and self.sound(generation)

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
            states[j]["generated_tokens"] += output.n_tokens
            cut = marker_prefix(self.tokenizer, output.token_ids, config.analyze_marker)
            states[j]["analysis"] = self.tokenizer.decode(
                output.token_ids[: cut or len(output.token_ids)], skip_special_tokens=True
            )
            if cut is None or (self.context and len(hinted_ids[j]) + cut >= self.context):
                states[j]["drop_reason"] = "no analysis marker" if cut is None else "analysis fills the context"
                continue
            hinted_ids[j] = hinted_ids[j] + output.token_ids[:cut]
            kept.append(j)
        return kept

    def _record(self, row: Prepared, state: dict) -> dict:
        config = self.config
        record = {**row.example.record, "_index": row.example.index}
        response = verdict = None
        provenance, tries, mean_lambda = "dropped", 0, None
        if config.keep_own and state["own"]:
            response, verdict = state["own"]
            provenance = "own"
        elif state.get("hinted"):
            response, verdict, tries = state["hinted"]
            provenance = "hinted" if verdict.correct and self.keepable(response) else "dropped"
            mean_lambda = response.mean_lambda
        record.update(
            response=response.text if response is not None else None,
            provenance=provenance,
            verified=bool(verdict is not None and verdict.correct),
            mean_phi=None,
            z=None,
            p_value=None,
            scored_tokens=None,
            finish_reason=response.finish_reason if response is not None else None,
            n_tokens=response.n_tokens if response is not None else 0,
            reference_mean_phi=None,
            reference_z=None,
            own_correct=state["own_correct"],
            own_samples=config.own_samples,
            hinted_tries=tries,
            mean_lambda=mean_lambda,
            extracted_answer=verdict.extracted if verdict is not None else None,
            verify_method=verdict.method if verdict is not None else None,
            generated_tokens=state["generated_tokens"],
            # The response did not end by itself (the token limit or a repetition loop; see finish_reason).
            truncated=response is not None and response.finish_reason not in ENDED,
            score_truncated=False,
        )
        if self.step_checker is not None and response is not None:
            report = self.step_checker(response.text)
            record.update(false_steps=report.false, steps_checked=report.checked)
        else:
            record.update(false_steps=None, steps_checked=None)
        if config.analyze_first:
            record["analysis"] = state.get("analysis")
        if provenance == "dropped":
            record["drop_reason"] = state.get("drop_reason") or "not verified"
        return record

    def _score(self, rows: Sequence[Prepared], records: list[dict]) -> None:
        """mean phi, Z, p of each response and of each reference, under the plain context, in place."""
        items, targets = [], []
        limit = min(self.config.max_length, self.context) if self.context else self.config.max_length
        for row, record in zip(rows, records):
            for text, prefix in ((record["response"], ""), (row.example.reference, "reference_")):
                if text is None:
                    continue
                response = encode_response(self.tokenizer, row.example.prompt, text, row.plain_ids)
                if not response:
                    continue
                room = limit - len(row.plain_ids)
                truncated = len(response) > room
                items.append(Item(len(items), row.plain_ids + response[:room], len(row.plain_ids), truncated))
                targets.append((record, prefix))
        for batch, scores, _ in self.scorer.iter_scored(items):
            for i, score in zip(batch, scores):
                record, prefix = targets[i]
                record[prefix + "mean_phi"], record[prefix + "z"] = score["mean_phi"], score["z"]
                if not prefix:
                    record.update(
                        p_value=score["p_value"], scored_tokens=score["n_tokens"], score_truncated=items[i].truncated
                    )


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
    model's onsft.json contents; default {} = the generic template). Writes nothing."""
    config = config or RewriteConfig(data="in-memory")
    hinted = hinted or HintedConfig()
    config.validate()
    hinted.validate()
    check_columns(examples, "examples")
    hint = hint or resolve_hint(
        config.hint_template, config.hint_system, hinted.answer_marker, config.analyze_first, info or {}
    )
    verifier = get_verifier(verifier or "math")
    step_checker = config.build_step_checker()
    prepared = prepare(tokenizer, examples, hint, config.max_length, context_length(model), "examples")
    rewriter = Rewriter(model, tokenizer, config, hinted, scoring or ScoringConfig(), hint, verifier, step_checker)
    records: list[dict] = []
    for span in chunks(len(prepared), config.chunk_size):
        records += rewriter.chunk([prepared[i] for i in span])
    return [{k: v for k, v in r.items() if k != "_index"} for r in records]
