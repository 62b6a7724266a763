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
from dataclasses import dataclass, field

from onsft.data.chat import encode_prompt, encode_response
from onsft.data.rows import DataArguments, Example
from onsft.data.verify import Verifier, get_verifier
from onsft.engine.decoding import SamplingConfig, generate
from onsft.engine.hinted import HintedConfig, hinted_decode
from onsft.engine.scoring import Item, ScoringConfig
from onsft.errors import UserError
from onsft.pipeline.hints import HintSettings, hinted_messages, resolve_hint
from onsft.runtime.device import stream_seed
from onsft.runtime.models import context_length, pad_token_id

PROVENANCES = ("own", "hinted", "dropped")
# Finish reasons of a response the model ended itself; the others (the token limit, a repetition loop) were
# cut by the decoder: not a finished solution, and training on it with the chat template's end of turn
# appended would teach an ending the model did not choose.
ENDED = ("eos", "stop")
# Fields this command adds to every record; an input column with one of these names is refused.
ADDED_FIELDS = (
    "response",
    "provenance",
    "verified",
    "mean_phi",
    "z",
    "p_value",
    "scored_tokens",
    "finish_reason",
    "n_tokens",
    "reference_mean_phi",
    "reference_z",
    "own_correct",
    "own_samples",
    "hinted_tries",
    "mean_lambda",
    "extracted_answer",
    "verify_method",
    "generated_tokens",
    "truncated",
    "score_truncated",
    "analysis",
    "drop_reason",
)


@dataclass
class RewriteConfig(DataArguments):
    """The rewrite pipeline's own settings (the data: rows with a prompt, an `answer` and a `reference`
    solution); hinted decoding's are `HintedConfig`'s (also the own samples' token limit and seed),
    scoring's `ScoringConfig`'s, checking `VerifyConfig`'s."""

    out: str = field(default="", metadata={"help": "Output folder: records.jsonl, train.jsonl, summary.json."})
    train_out: str = field(
        default="", metadata={"help": "Training-ready file of the kept rows (default: OUT/train.jsonl)."}
    )
    own_samples: int = field(
        default=4,
        metadata={
            "help": "k: own answers sampled per prompt (plain context) before rewriting; 0 = rewrite every prompt."
        },
    )
    own_temperature: float = field(
        default=1.0, metadata={"help": "Temperature of the own samples (1 = the model's distribution itself)."}
    )
    own_top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling of the own samples (1 = off)."})
    own_batch_size: int = field(default=32, metadata={"help": "Own samples decoded together (rows)."})
    keep_own: bool = field(
        default=True,
        metadata={
            "help": "Keep a verified own answer as it is (provenance own) instead of rewriting that prompt "
            "(false: rewrite every prompt; own samples are only counted)."
        },
    )
    keep_truncated: bool = field(
        default=False,
        metadata={
            "help": "Keep verified responses that did not end (cut at --max_new_tokens or at a repetition "
            "loop; `truncated: true` in records.jsonl). Default: such a response is not a finished "
            "solution and is not kept."
        },
    )
    samples_per_prompt: int = field(
        default=1,
        metadata={
            "help": "Hinted-decoding tries per prompt the model fails, decoded together; the first verified "
            "try is kept."
        },
    )
    hint_template: str | None = field(
        default=None,
        metadata={
            "help": "User message of the hinted context with {question} and {reference}. Default: the "
            "model's onsft.json, else a generic rewrite instruction."
        },
    )
    hint_system: str | None = field(
        default=None,
        metadata={
            "help": "System message of the hinted context ('' = none). Default: the model's onsft.json (none "
            "if it has no hint_system), else a generic rewrite instruction."
        },
    )
    analyze_first: bool = field(
        default=False,
        metadata={
            "help": "Let the model first write an '# Analyze' part greedily from the hinted context; the "
            "response starts after its --analyze_marker. Rows that never reach the marker are dropped."
        },
    )
    analyze_marker: str = field(default="# CoT", metadata={"help": "End of the analysis (--analyze_first)."})
    analyze_max_new_tokens: int = field(default=1024, metadata={"help": "Most tokens of the analysis."})
    chunk_size: int = field(
        default=16,
        metadata={"help": "Prompts processed (and written) together; results depend on it through the seeding."},
    )
    max_length: int = field(
        default=4096,
        metadata={
            "help": "Most tokens of plain prompt + response when scoring (longer responses are scored "
            "truncated, flagged)."
        },
    )

    def validate(self) -> None:
        checks = [
            (bool(self.data), "data", "is required", "pass --data FILE."),
            (self.own_samples >= 0, "own_samples", "must be >= 0", "pass 0 or more."),
            (self.samples_per_prompt >= 1, "samples_per_prompt", "must be >= 1", "pass 1 or more."),
            (
                self.own_temperature >= 0 and 0 < self.own_top_p <= 1,
                "own_temperature/own_top_p",
                "must be >= 0 and in (0, 1]",
                "pass valid own-sample settings.",
            ),
            (
                self.analyze_max_new_tokens >= 1 and bool(self.analyze_marker),
                "analyze_max_new_tokens/analyze_marker",
                "must be >= 1 and non-empty",
                "pass a positive token count and a marker.",
            ),
            (
                min(self.chunk_size, self.own_batch_size) >= 1,
                "chunk_size/own_batch_size",
                "must be >= 1",
                "pass positive sizes.",
            ),
            (self.max_length >= 2, "max_length", "must be >= 2", "pass a larger --max_length."),
        ]
        for ok, name, why, fix in checks:
            if not ok:
                raise UserError(f"`{name}` {why}", where="config", fix=fix)


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
    ):
        self.model, self.tokenizer, self.config, self.hint, self.verifier = model, tokenizer, config, hint, verifier
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
                    if state["own"] is None and self.usable(sample):
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
                    if chosen is not None and chosen[1].correct and self.usable(chosen[0]):
                        continue
                    verdict = self.verifier.check(output.text, rows[j].example.answer)
                    looked += 1
                    # The first verified, finished try wins; without one a verified try that was cut is
                    # shown (dropped, "truncated"), else the last try ("not verified").
                    if chosen is None or verdict.correct or not chosen[1].correct:
                        chosen = (output, verdict)
                if chosen[1].correct and not self.usable(chosen[0]):
                    states[j]["drop_reason"] = "truncated"
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
            provenance = "hinted" if verdict.correct and self.usable(response) else "dropped"
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
    prepared = prepare(tokenizer, examples, hint, config.max_length, context_length(model), "examples")
    rewriter = Rewriter(model, tokenizer, config, hinted, scoring or ScoringConfig(), hint, verifier)
    records: list[dict] = []
    for span in chunks(len(prepared), config.chunk_size):
        records += rewriter.chunk([prepared[i] for i in span])
    return [{k: v for k, v in r.items() if k != "_index"} for r in records]


def check_columns(examples: Sequence[Example], where: str) -> None:
    for column in ("answer", "reference"):
        missing = [e for e in examples if getattr(e, column) is None or not str(getattr(e, column)).strip()]
        if missing:
            raise UserError(
                f"{len(missing)} row(s) have no `{column}`, which rewriting needs",
                where=where,
                line=missing[0].line,
                fix=f"add a non-empty `{column}` column to every row"
                + (" (e.g. copy the teacher's `completion`)." if column == "reference" else "."),
            )
    clashes = sorted({key for e in examples for key in e.record if key in ADDED_FIELDS})
    if clashes:
        first = next(e for e in examples if clashes[0] in e.record)
        raise UserError(
            f"input column(s) {', '.join(f'`{c}`' for c in clashes)} would be overwritten by this "
            "command's output fields",
            where=where,
            line=first.line,
            fix="rename or drop those columns (e.g. when rewriting a previous records.jsonl).",
        )
