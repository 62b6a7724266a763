"""The rewrite pipeline's settings (`RewriteConfig`), the fields it adds to every record, and the check of the
input columns it needs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from onsft.data.rows import DataArguments, Example
from onsft.data.step_check import StepCheckConfig
from onsft.engine.hinted import HintedConfig
from onsft.errors import UserError
from onsft.pipeline.rewrite.best_of_n import SAMPLE_SLOTS, BestOfNConfig
from onsft.pipeline.rewrite.hint_profiles import RewriteProfile
from onsft.pipeline.rewrite.hint_prompts import FORMS, HintSettings, resolve_hint

PROVENANCES = ("own", "hinted", "dropped")
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
    "sample_index",
    "beta",
    "mean_lambda",
    "handed_over",
    "extracted_answer",
    "verify_method",
    "generated_tokens",
    "truncated",
    "score_truncated",
    "false_steps",
    "steps_checked",
    "candidates",
    "also_kept",
    "analysis",
    "drop_reason",
)


@dataclass
class RewriteConfig(StepCheckConfig, BestOfNConfig, DataArguments):
    """The rewrite pipeline's own settings (the data: rows with a prompt, an `answer` and a `reference`
    solution; the candidates per failed prompt: `BestOfNConfig`; the step check of kept responses:
    `StepCheckConfig`); hinted decoding's are `HintedConfig`'s (also the own samples' token limit and seed),
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
    hint_form: str = field(
        default="auto",
        metadata={
            "help": "instruction: a system instruction, then the question and the reference in one user turn "
            "(the paper's); restate: the plain prompt, the reference as the model's earlier answer and "
            "--hint_followup (for small chat models); auto: the model's rewrite profile, else instruction.",
            "choices": FORMS,
        },
    )
    hint_followup: str | None = field(
        default=None,
        metadata={"help": "The user turn after the reference in the restate form. Default: the profile's."},
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
        metadata={
            "help": "Prompts processed (and written) together: the granularity of writes and scoring (samples are "
            "seeded per row and sample, so results do not depend on it)."
        },
    )
    max_length: int = field(
        default=4096,
        metadata={
            "help": "Most tokens of plain prompt + response when scoring (longer responses are scored "
            "truncated, flagged)."
        },
    )

    def hint(self, hinted: HintedConfig, info: dict, profile: RewriteProfile | None) -> HintSettings:
        """The hinted context's format: these flags (and hinted decoding's marker, beta and
        marker_before_stop), else the model folder's onsft.json, else its family's rewrite profile, else the
        generic instruction."""
        return resolve_hint(
            self.hint_template,
            self.hint_system,
            hinted.answer_marker,
            self.analyze_first,
            info,
            profile,
            form=self.hint_form,
            followup=self.hint_followup,
            beta=hinted.beta,
            marker_before_stop=hinted.marker_before_stop,
        )

    def validate(self) -> None:
        StepCheckConfig.validate(self)
        BestOfNConfig.validate(self)
        checks = [
            (bool(self.data), "data", "is required", "pass --data FILE."),
            (
                0 <= self.own_samples < SAMPLE_SLOTS,
                "own_samples",
                f"must be >= 0 and < {SAMPLE_SLOTS}",
                "pass 0 or more.",
            ),
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
