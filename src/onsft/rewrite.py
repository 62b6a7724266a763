"""`onsft rewrite`: turn off-policy reference solutions into the model's own, verified responses.

    onsft rewrite --model organism --data teacher.jsonl --out runs/rewrite
    onsft train --data runs/rewrite/train.jsonl ...

The pipeline (spec section 3, "The data pipeline around it"), for every prompt:
  1. sample `--own_samples` (k) answers of the model itself from the plain context (the ordinary chat
     prompt) and verify them against the `answer` column; with `--keep_own` (default) the first
     verified one is kept as it is: provenance `own` (it is on-policy already);
  2. otherwise run hinted decoding (`onsft.hinted`): one response shared by the plain context and a
     hinted context (the hint template filled with the question and the `reference` column, under the
     chat template), `--hinted_samples` tries decoded together; the first verified try is kept:
     provenance `hinted`; when none verifies: `dropped` (the last try is shown, not trained on);
  3. score every response, and the original reference, with DDT under the plain context (the audit's
     streamed scorer): mean phi, Z and p-value, so the summary shows how far rewriting moved the data.

Outputs in --out:
  records.jsonl  every input row once, in input order, its fields untouched, plus: response, provenance
                 (own|hinted|dropped), verified, mean_phi, z, p_value, scored_tokens, finish_reason,
                 n_tokens (generated tokens of the response), reference_mean_phi, reference_z,
                 own_correct (verified own samples of k), own_samples, hinted_tries, mean_lambda,
                 extracted_answer, verify_method, generated_tokens (all tokens decoded for the row),
                 truncated, and `analysis` with --analyze_first. An input column of one of these names
                 is an error (rename it), never silently replaced.
  train.jsonl    (or --train_out) the kept rows only (own + hinted), training-ready: `prompt` (as given)
                 + `completion` = the response, plus answer, provenance, mean_phi and the other input
                 columns; `onsft train --data` reads it directly.
  summary.json   counts own-correct / rewritten / dropped, mean phi of the references vs the rewritten
                 responses vs the own answers, throughput, wall time and the settings.

Resuming: rows are appended to records.jsonl.partial after every chunk of `--chunk_size` prompts
(flushed and fsynced); a killed run (even SIGKILL) rerun with the same command skips the finished rows,
and the final files appear only when every row is done. Rerunning a finished run does nothing. A
partial file from different settings is refused (delete it to start over).

Reproducibility: all sampling of a chunk is seeded by (--seed, the chunk's first row), so results
depend on --seed and --chunk_size but not on the decode batch sizes, on resuming, or on the number of
processes. Under `accelerate launch` / torchrun each process takes the chunks c with c % N == rank,
writes records.rank<r>-of-<N>.jsonl.partial, and rank 0 merges in input order. (Chunks rather than
single rows are dealt out because a row's random stream is fixed by its position in its decode
batch; dealing whole chunks keeps every batch, so the merged output equals a one-process run.)

Hint template: the hinted context is [system: hint system] + [user: hint template], with `{question}`
(the last user turn, after the prompt's own system text if it has one) and `{reference}` filled in.
Default: the model folder's onsft.json (`hint_template`, `hint_system`, `answer_marker`) when it has
one -- the organism was pretrained on exactly that format -- else a generic instruction to rewrite
the reference as the model's own step-by-step reasoning (`DEFAULT_HINT_SYSTEM`, `DEFAULT_HINT_TEMPLATE`).

--analyze_first (off by default) follows the reference code: the model first writes, greedily from
the hinted context, an "# Analyze" part that checks the reference, up to and including its first
`--analyze_marker` ("# CoT"); that text joins the hinted context and the shared response starts
after it. A row whose analysis never reaches the marker is dropped, as the reference code skips it.
(The reference cuts at the *last* marker of a full greedy output; the first one is where the model's
own solution begins.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from onsft.config import parse_command
from onsft.data import Example, Messages, encode_prompt, encode_response, load_examples
from onsft.errors import UserError
from onsft.records import check_writable, write_json_atomic, write_jsonl_atomic

MODES = ("linear", "sigmoid", "piecewise")
PROVENANCES = ("own", "hinted", "dropped")
DEFAULT_ANSWER_MARKER = "\\boxed{"
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
    "analysis",
    "drop_reason",
)


@dataclass
class RewriteConfig:
    """`onsft rewrite` options."""

    model: str = field(
        default="",
        metadata={
            "help": "Model whose distribution the data is rewritten into: local "
            "folder, cached Hub name or alias (organism)."
        },
    )
    data: str = field(
        default="",
        metadata={
            "help": "Rows with a prompt, an `answer` (gold final answer) and a "
            "`reference` (correct solution): .jsonl/.parquet/.csv/folder."
        },
    )
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
    keep_own: bool = field(
        default=True,
        metadata={
            "help": "Keep a verified own answer as it is (provenance own) "
            "instead of rewriting that prompt (false: rewrite every "
            "prompt; own samples are only counted)."
        },
    )
    hinted_samples: int = field(
        default=1,
        metadata={
            "help": "Hinted-decoding tries per prompt the model fails, "
            "decoded together; the first verified try is kept."
        },
    )
    beta: float = field(
        default=3.0,
        metadata={
            "help": "Entropy scale of lambda (plain context's weight); 0 = "
            "rewrite from the hinted context alone (self-distillation)."
        },
    )
    mode: str = field(
        default="linear",
        metadata={"help": "lambda rule: linear, sigmoid or piecewise (see onsft.hinted.mixing_weight)."},
    )
    temperature: float = field(default=0.3, metadata={"help": "Temperature of hinted decoding (0 = greedy)."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling of hinted decoding (1 = off)."})
    max_new_tokens: int = field(
        default=2048, metadata={"help": "Most tokens per response (own samples and hinted decoding)."}
    )
    answer_marker: str | None = field(
        default=None,
        metadata={
            "help": "Once generated, the plain context alone finishes the response ('' = never). Default: the "
            "model's onsft.json, else \\boxed{."
        },
    )
    hint_template: str | None = field(
        default=None,
        metadata={
            "help": "User message of the hinted context with {question} and {reference}. Default: the model's "
            "onsft.json, else a generic rewrite instruction."
        },
    )
    hint_system: str | None = field(
        default=None,
        metadata={
            "help": "System message of the hinted context ('' = none). Default: the model's onsft.json (none if it "
            "has no hint_system), else a generic rewrite instruction."
        },
    )
    analyze_first: bool = field(
        default=False,
        metadata={
            "help": "Let the model first write an '# Analyze' part greedily from the hinted context; the response "
            "starts after its --analyze_marker. Rows that never reach the marker are dropped."
        },
    )
    analyze_marker: str = field(default="# CoT", metadata={"help": "End of the analysis (--analyze_first)."})
    analyze_max_new_tokens: int = field(default=1024, metadata={"help": "Most tokens of the analysis."})
    verifier: str = field(
        default="math",
        metadata={"help": "math | exact | module:function | path/file.py:function (response, answer) -> bool."},
    )
    verify_timeout: int = field(default=5, metadata={"help": "Seconds math-verify may spend per parse/compare."})
    seed: int = field(default=0, metadata={"help": "Sampling seed (own samples and hinted decoding)."})
    chunk_size: int = field(
        default=16,
        metadata={"help": "Prompts processed (and written) together; results depend on it through the seeding."},
    )
    batch_size: int = field(default=32, metadata={"help": "Own samples decoded together (rows)."})
    hinted_batch_size: int = field(
        default=16, metadata={"help": "Hinted-decoding examples decoded together (two rows each)."}
    )
    score_batch_size: int = field(default=16, metadata={"help": "Responses per scoring pass."})
    max_batch_tokens: int = field(default=8192, metadata={"help": "Most padded tokens per scoring pass."})
    max_length: int = field(
        default=4096,
        metadata={
            "help": "Most tokens of plain prompt + response when scoring "
            "(longer responses are scored truncated, flagged)."
        },
    )
    dtype: str = field(
        default="auto", metadata={"help": "auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16 or float16."}
    )
    device: str = field(default="auto", metadata={"help": "auto (the process's accelerator, else CPU), cpu, cuda."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar with ETA."})

    def validate(self) -> None:
        checks = [
            (bool(self.model), "model", "is required", "pass --model NAME_OR_PATH."),
            (bool(self.data), "data", "is required", "pass --data FILE."),
            (self.own_samples >= 0, "own_samples", "must be >= 0", "pass 0 or more."),
            (self.hinted_samples >= 1, "hinted_samples", "must be >= 1", "pass 1 or more."),
            (
                self.own_temperature >= 0 and 0 < self.own_top_p <= 1,
                "own_temperature/own_top_p",
                "must be >= 0 and in (0, 1]",
                "pass valid own-sample settings.",
            ),
            (self.mode in MODES, "mode", "is unknown", f"use one of {', '.join(MODES)}."),
            (
                self.analyze_max_new_tokens >= 1 and bool(self.analyze_marker),
                "analyze_max_new_tokens/analyze_marker",
                "must be >= 1 and non-empty",
                "pass a positive token count and a marker.",
            ),
            (
                min(
                    self.chunk_size,
                    self.batch_size,
                    self.hinted_batch_size,
                    self.score_batch_size,
                    self.max_batch_tokens,
                )
                >= 1,
                "chunk_size/batch sizes",
                "must be >= 1",
                "pass positive sizes.",
            ),
            (self.max_length >= 2, "max_length", "must be >= 2", "pass a larger --max_length."),
            (self.verify_timeout >= 1, "verify_timeout", "must be at least 1 second", "pass --verify_timeout 5."),
            (
                self.dtype in ("auto", "float32", "bfloat16", "float16"),
                "dtype",
                "is unknown",
                "use auto, float32, bfloat16 or float16.",
            ),
        ]
        for ok, name, why, fix in checks:
            if not ok:
                raise UserError(f"`{name}` {why}", where="config", fix=fix)
        self.hinted_config(marker="").validate()
        self.own_config().validate()

    def hinted_config(self, marker: str, seed: int | None = None):
        from onsft.hinted import HintedConfig

        return HintedConfig(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            beta=self.beta,
            mode=self.mode,
            answer_marker=marker,
            seed=self.seed if seed is None else seed,
            batch_size=self.hinted_batch_size,
        )

    def own_config(self, seed: int | None = None):
        from onsft.generation import SamplingConfig

        return SamplingConfig(
            max_new_tokens=self.max_new_tokens,
            temperature=self.own_temperature,
            top_p=self.own_top_p,
            seed=self.seed if seed is None else seed,
            batch_size=self.batch_size,
        )


# ------------------------------------------------------------------------------------- hint settings


@dataclass
class HintSettings:
    """How the hinted context is built, resolved from the flags and the model folder's onsft.json."""

    template: str
    system: str
    answer_marker: str
    source: str  # where the template came from: flag, onsft.json or default


def read_model_info(model: str) -> dict:
    """The model folder's onsft.json ({} when there is none)."""
    from onsft.models import resolve_model_path

    path = Path(resolve_model_path(model))
    path = path.parent if path.is_file() else path
    info = path / "onsft.json"
    if not info.is_file():
        return {}
    try:
        value = json.loads(info.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(
            f"cannot read the model's onsft.json ({error})",
            where=str(info),
            fix="fix or delete the file, or pass --hint_template and --answer_marker.",
        ) from None
    return value if isinstance(value, dict) else {}


def resolve_hint(config: RewriteConfig, info: dict) -> HintSettings:
    has_template = isinstance(info.get("hint_template"), str)
    if config.hint_template is not None:
        template, source = config.hint_template, "flag"
    elif has_template:
        template, source = info["hint_template"], "onsft.json"
    else:
        template, source = DEFAULT_HINT_TEMPLATE, "default"
    if config.hint_system is not None:
        system = config.hint_system
    elif has_template:
        # The model learned its template as it is; a system turn it never saw would change the context.
        system = str(info.get("hint_system") or "")
    else:
        system = DEFAULT_ANALYZE_SYSTEM if config.analyze_first else DEFAULT_HINT_SYSTEM
    if config.answer_marker is not None:
        marker = config.answer_marker
    else:
        marker = str(info.get("answer_marker", DEFAULT_ANSWER_MARKER))
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


# ------------------------------------------------------------------------------------- the pipeline


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


def stream_seed(seed: int, stage: str, start: int) -> int:
    """The seed of one stage of one chunk: fixed by (seed, stage, first row), so a chunk samples the same
    whether it runs first, after a restart, or in another process."""
    digest = hashlib.sha256(f"onsft-rewrite:{seed}:{stage}:{start}".encode()).digest()
    return int.from_bytes(digest[:7], "big")


class Rewriter:
    """The model, tokenizer, settings, verifier and scorer that rewrite chunks of prepared rows."""

    def __init__(self, model, tokenizer, config: RewriteConfig, hint: HintSettings, verifier):
        from onsft import ddt
        from onsft.audit import Scorer, pad_token_id

        self.model, self.tokenizer, self.config, self.hint, self.verifier = model, tokenizer, config, hint, verifier
        self.context = getattr(model.config, "max_position_embeddings", None)
        self.scorer = Scorer(
            model, [1.0], ddt.OOD_THRESHOLD, pad_token_id(tokenizer), config.score_batch_size, config.max_batch_tokens
        )
        self.generated = 0  # tokens decoded by this object (throughput)

    def chunk(self, rows: Sequence[Prepared], progress: Callable[[int], None] | None = None) -> list[dict]:
        """Records (input fields + results, keyed by `_index`) for consecutive rows; deterministic given rows."""
        from onsft.generation import generate
        from onsft.hinted import hinted_decode

        config, k, start = self.config, self.config.own_samples, rows[0].example.index
        states = [{"own_correct": 0, "generated_tokens": 0, "own": None} for _ in rows]
        if k:
            prompts = [row.plain_ids for row in rows for _ in range(k)]
            sampling = config.own_config(stream_seed(config.seed, "own", start))
            samples = generate(self.model, self.tokenizer, prompts, sampling)
            for slot, sample in enumerate(samples):
                state, row = states[slot // k], rows[slot // k]
                verdict = self.verifier.check(sample.text, row.example.answer)
                state["generated_tokens"] += sample.n_tokens
                if verdict.correct:
                    state["own_correct"] += 1
                    state["own"] = state["own"] or (sample, verdict)
        rewrite = [j for j, state in enumerate(states) if not (config.keep_own and state["own"])]
        if progress is not None:
            progress(len(rows) - len(rewrite))
        hinted_ids = {j: rows[j].hinted_ids for j in rewrite}
        pending = len(rewrite)
        if config.analyze_first and rewrite:
            rewrite = self._analyze(rows, rewrite, states, hinted_ids)
        if rewrite:
            tries = config.hinted_samples
            plain = [rows[j].plain_ids for j in rewrite for _ in range(tries)]
            hinted = [hinted_ids[j] for j in rewrite for _ in range(tries)]
            hd = config.hinted_config(self.hint.answer_marker, stream_seed(config.seed, "hinted", start))
            outputs = hinted_decode(self.model, self.tokenizer, plain, hinted, hd)
            for slot, j in enumerate(rewrite):
                chosen = None
                for t, output in enumerate(outputs[slot * tries : (slot + 1) * tries]):
                    states[j]["generated_tokens"] += output.n_tokens
                    if chosen is None or not chosen[1].correct:
                        verdict = self.verifier.check(output.text, rows[j].example.answer)
                        # The first verified try wins; without one the last try is shown (dropped).
                        chosen = (output, verdict, t + 1)
                states[j]["hinted"] = chosen
        if progress is not None and pending:
            progress(pending)
        records = [self._record(row, state) for row, state in zip(rows, states)]
        self.generated += sum(state["generated_tokens"] for state in states)
        self._score(rows, records)
        return records

    def _analyze(self, rows, rewrite: list[int], states, hinted_ids: dict[int, list[int]]) -> list[int]:
        """Greedy analysis from the hinted context up to the first marker; it joins the hinted context.
        Returns the rows that reached the marker; the others are marked dropped."""
        from onsft.generation import SamplingConfig, generate

        config = self.config
        greedy = SamplingConfig(
            max_new_tokens=config.analyze_max_new_tokens, temperature=0.0, batch_size=config.hinted_batch_size
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
            provenance = "hinted" if verdict.correct else "dropped"
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
            truncated=False,
        )
        if config.analyze_first:
            record["analysis"] = state.get("analysis")
        if provenance == "dropped":
            record["drop_reason"] = state.get("drop_reason") or "not verified"
        return record

    def _score(self, rows: Sequence[Prepared], records: list[dict]) -> None:
        """mean phi, Z, p of each response and of each reference, under the plain context, in place."""
        from onsft.audit import Item

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
                        p_value=score["p_value"], scored_tokens=score["n_tokens"], truncated=items[i].truncated
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
    *,
    verifier=None,
    hint: HintSettings | None = None,
    info: dict | None = None,
) -> list[dict]:
    """In-memory rewrite (the demo, tests): one record per example, in order, as records.jsonl holds them.
    `verifier`: a spec or callable (default config.verifier); `hint`: default resolved from `info` (a
    model's onsft.json contents; default {} = the generic template). Writes nothing."""
    from onsft.verify import get_verifier

    config = config or RewriteConfig(model="in-memory", data="in-memory")
    config.validate()
    check_columns(examples, "examples")
    hint = hint or resolve_hint(config, info or {})
    verifier = get_verifier(verifier or config.verifier, timeout_seconds=config.verify_timeout)
    prepared = prepare(
        tokenizer, examples, hint, config.max_length, getattr(model.config, "max_position_embeddings", None), "examples"
    )
    rewriter = Rewriter(model, tokenizer, config, hint, verifier)
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


# ------------------------------------------------------------------------------------- outputs


def train_rows(records: Sequence[dict]) -> list[dict]:
    """The kept rows as prompt + completion (the response); other input columns stay, except the ones
    that would give `onsft train` a second prompt/response (`messages`)."""
    rows = []
    for record in records:
        if record["provenance"] == "dropped":
            continue
        if "messages" in record and record["messages"] is not None:
            turns = record["messages"]
            last = max((i for i, t in enumerate(turns) if t.get("role") == "assistant"), default=len(turns))
            prompt = turns[:last]
        else:
            prompt = record["prompt"]
        base = {k: v for k, v in record.items() if k not in ("messages", "prompt", "completion", *ADDED_FIELDS)}
        rows.append(
            {
                "prompt": prompt,
                "completion": record["response"],
                **base,
                "provenance": record["provenance"],
                "mean_phi": record["mean_phi"],
            }
        )
    return rows


def _phi_stats(records: Sequence[dict], key: str = "mean_phi", tokens: str = "scored_tokens") -> dict:
    scored = [r for r in records if r.get(key) is not None]
    if not scored:
        return {"n": 0}
    stats = {"n": len(scored), "mean_phi": sum(r[key] for r in scored) / len(scored)}
    if tokens and all(r.get(tokens) for r in scored):
        total = sum(r[tokens] for r in scored)
        stats["mean_phi_token_weighted"] = sum(r[key] * r[tokens] for r in scored) / total
    z_key = key.replace("mean_phi", "z")
    stats["mean_z"] = sum(r[z_key] for r in scored) / len(scored)
    return stats


def summarize(records: Sequence[dict]) -> dict:
    """Counts and mean phi per provenance from finished records (pure)."""
    n = len(records)
    count = Counter(r["provenance"] for r in records)
    attempted = [
        r for r in records if r["hinted_tries"] or str(r.get("drop_reason")).startswith(("no analysis", "analysis"))
    ]
    k = records[0]["own_samples"] if records else 0
    rewritten = [r for r in records if r["provenance"] == "hinted"]
    return {
        "rows": n,
        "own_correct": count["own"],
        "rewritten": count["hinted"],
        "dropped": count["dropped"],
        "kept": count["own"] + count["hinted"],
        "prompts_with_an_own_correct_sample": sum(r["own_correct"] > 0 for r in records),
        "own_sample_accuracy": sum(r["own_correct"] for r in records) / (n * k) if n and k else None,
        "hinted_attempted": len(attempted),
        "hinted_success_rate": count["hinted"] / len(attempted) if attempted else None,
        "mean_phi": {
            "references": _phi_stats(records, "reference_mean_phi", ""),
            "references_of_rewritten": _phi_stats(rewritten, "reference_mean_phi", ""),
            "rewritten": _phi_stats(rewritten),
            "own": _phi_stats([r for r in records if r["provenance"] == "own"]),
            "kept": _phi_stats([r for r in records if r["provenance"] != "dropped"]),
            "dropped": _phi_stats([r for r in records if r["provenance"] == "dropped"]),
        },
        "finish_reasons": dict(sorted(Counter(r["finish_reason"] for r in records if r["finish_reason"]).items())),
        "verify_methods": dict(sorted(Counter(r["verify_method"] for r in records if r["verify_method"]).items())),
        "generated_tokens": sum(r["generated_tokens"] for r in records),
    }


# ------------------------------------------------------------------------------------- command


def _settings(config: RewriteConfig, hint: HintSettings, data_identity: dict, dtype) -> dict:
    """What changes results: a resumed run must match it, and a finished run with it is not redone."""
    ignored = (
        "out",
        "train_out",
        "progress",
        "batch_size",
        "hinted_batch_size",
        "score_batch_size",
        "max_batch_tokens",
        "device",
    )
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in ignored}
    settings.update(command="rewrite", data=data_identity, dtype=str(dtype), hint=dataclasses.asdict(hint))
    return settings


def _finished(out: Path, train_out: Path, settings: dict, main: bool) -> dict | None:
    """The summary of a finished run with these settings (a rerun must not redo it). A training file
    asked for under another name is written from the finished records."""
    try:
        saved = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    records = out / "records.jsonl"
    if json.loads(json.dumps(settings, default=str)) != saved.get("settings") or not records.is_file():
        return None
    if main and not train_out.is_file():
        rows = [json.loads(line) for line in records.read_text(encoding="utf-8").splitlines()]
        write_jsonl_atomic(train_out, train_rows(rows))
    return saved


def _context_length(model: str) -> int | None:
    """The model's context (max_position_embeddings) from its config alone, without loading weights."""
    from transformers import AutoConfig

    from onsft.models import resolve_model_path

    try:
        loaded = AutoConfig.from_pretrained(resolve_model_path(model), local_files_only=True)
    except (OSError, ValueError, KeyError):  # a .gguf file has no config.json; its limit applies when decoding
        return None
    loaded = getattr(loaded, "text_config", None) or loaded
    return getattr(loaded, "max_position_embeddings", None)


def run_rewrite(config: RewriteConfig) -> dict | None:
    """The command: returns the summary on rank 0 (None on other ranks)."""
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    from onsft.audit import Distributed, ShardStore, data_identity, resolve_dtype
    from onsft.models import load_model, load_tokenizer
    from onsft.verify import get_verifier

    started = time.time()
    config.validate()
    if not config.out:
        raise UserError("`out` is required", where="config", fix="pass --out FOLDER.")
    out = Path(config.out)
    train_out = Path(config.train_out) if config.train_out else out / "train.jsonl"
    # Everything a user can get wrong is checked before anything is written.
    verifier = get_verifier(config.verifier, timeout_seconds=config.verify_timeout)
    examples = load_examples(config.data, require_response=False)
    check_columns(examples, config.data)
    tokenizer = load_tokenizer(config.model)
    hint = resolve_hint(config, read_model_info(config.model))
    check_writable(out / "records.jsonl")
    check_writable(train_out)
    dist = Distributed(config.device)
    dtype = resolve_dtype(config.dtype, dist.device)
    settings = _settings(config, hint, data_identity(config.data), dtype)
    finished = _finished(out, train_out, settings, dist.main)
    if finished is not None:
        dist.barrier()
        if dist.main:
            print(
                f"onsft rewrite: {out} already holds this finished run; nothing to do (training file: {train_out}).",
                file=sys.stderr,
            )
        return finished if dist.main else None
    context = _context_length(config.model)
    prepared = prepare(tokenizer, examples, hint, config.max_length, context, config.data)
    # The model last: nothing it prints while loading comes before an error above.
    model = load_model(config.model, dtype, dist.device)
    if context is None and getattr(model.config, "max_position_embeddings", None):
        prepared = prepare(
            tokenizer, examples, hint, config.max_length, model.config.max_position_embeddings, config.data
        )

    _warn_other_shards(out, dist.world)
    store = ShardStore(out, "records", dist, settings)
    rewriter = Rewriter(model, tokenizer, config, hint, verifier)
    spans = chunks(len(prepared), config.chunk_size)
    mine = [span for span in spans[dist.rank :: dist.world]]
    todo = [span for span in mine if not all(prepared[i].example.index in store.done for i in span)]
    total = sum(len(span) for span in mine)
    decode_start = time.time()
    counts: Counter[str] = Counter(r["provenance"] for r in store.done.values())
    with tqdm(
        total=total,
        initial=total - sum(len(s) for s in todo),
        desc="rewrite",
        unit="prompt",
        dynamic_ncols=True,
        file=sys.stderr,
        disable=not (config.progress and dist.state.is_local_main_process),
    ) as bar:
        for span in todo:
            # A chunk is decoded whole even when a kill left part of it on disk: its samples depend on
            # the chunk, and rows already on disk are kept as they are.
            records = rewriter.chunk([prepared[i] for i in span], progress=bar.update)
            fresh = [r for r in records if r["_index"] not in store.done]
            store.add(fresh)
            counts.update(r["provenance"] for r in fresh)
            seconds = max(time.time() - decode_start, 1e-9)
            bar.set_postfix(
                own=counts["own"],
                hinted=counts["hinted"],
                dropped=counts["dropped"],
                tok_s=f"{rewriter.generated / seconds:.0f}",
                refresh=False,
            )
    decode_seconds = time.time() - decode_start
    throughput = (
        gather_object([(rewriter.generated, decode_seconds)])
        if dist.world > 1
        else [(rewriter.generated, decode_seconds)]
    )
    merged = store.merge()
    if not dist.main:
        return None
    merged = [{k: v for k, v in row.items() if k != "_index"} for row in merged]
    write_jsonl_atomic(train_out, train_rows(merged))
    generated_now = sum(tokens for tokens, _ in throughput)
    wall = time.time() - started
    summary = {
        "command": "rewrite",
        "model": config.model,
        "data": config.data,
        "processes": dist.world,
        **summarize(merged),
        "generated_tokens_this_run": generated_now,
        "decode_seconds_this_run": max(seconds for _, seconds in throughput),
        "tokens_per_second": generated_now / max(max(s for _, s in throughput), 1e-9) if generated_now else None,
        "wall_seconds": wall,
        "files": {"records": str(out / "records.jsonl"), "train": str(train_out)},
        "hint": dataclasses.asdict(hint),
        "config": dataclasses.asdict(config),
        "settings": json.loads(json.dumps(settings, default=str)),
    }
    write_json_atomic(out / "summary.json", summary)
    return summary


def _warn_other_shards(out: Path, world: int) -> None:
    def ours(name: str) -> bool:
        return name == "records.jsonl.partial" if world == 1 else f"-of-{world}." in name

    others = [p for p in sorted(out.glob("records*.jsonl.partial")) if not ours(p.name)]
    if others:
        print(
            f"onsft rewrite: {out} holds unfinished shards of a run with another number of processes "
            f"({others[0].name}); they are not resumed by this run (rerun with that many processes, or delete "
            "them).",
            file=sys.stderr,
        )


def _line(summary: dict) -> str:
    phi = summary["mean_phi"]

    def fmt(stats: dict) -> str:
        return f"{stats['mean_phi']:.3f}" if stats.get("n") else "-"

    speed = summary.get("tokens_per_second")
    return (
        f"onsft rewrite: {summary['rows']} prompts: own-correct {summary['own_correct']}, rewritten "
        f"{summary['rewritten']}, dropped {summary['dropped']}; mean phi references {fmt(phi['references'])} "
        f"(of rewritten rows {fmt(phi['references_of_rewritten'])}) -> rewritten {fmt(phi['rewritten'])}, own "
        f"{fmt(phi['own'])}; {summary['generated_tokens_this_run']} tokens generated"
        + (f" at {speed:.0f} tokens/s" if speed else "")
        + f", {summary['wall_seconds']:.1f} s; "
        f"{summary['files']['train']}"
    )


def main(argv: list[str] | None = None) -> int:
    (config,) = parse_command(argv, RewriteConfig, prog="onsft rewrite")
    summary = run_rewrite(config)
    if summary is not None:
        print(_line(summary))
    return 0
