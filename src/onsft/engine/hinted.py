"""Hinted decoding (HD): rewrite a reference solution into the model's own distribution.

One model, two contexts per example, one shared response. The *hinted* context holds the reference
(a rewriting instruction, the question and the reference solution); the *plain* context is the
ordinary chat prompt. At each step, with l_h and l_p the log-softmax of their next-token logits,

    lambda_t = clip(beta * H(softmax l_h) / log|V|, 0, 1)      (mode 'linear'; see `mixing_weight`)
    mixed    = (1 - lambda_t) * l_h + lambda_t * l_p            (a geometric mixture, renormalised)

and one token sampled from `mixed` is appended to both contexts. Where the hinted context is sure
(it knows what the reference says) it leads; where it hesitates the plain context's own habit
decides, so the text stays on-policy. The first token comes from the hinted context alone; once the
answer marker (default "\\boxed{") has been generated, the plain context alone finishes the text.

Both contexts are rows of one batch through one copy of the weights with one KV cache
(`onsft.engine.row_batch.RowBatch`); a hinted row leaves the batch at the hand-over, and both rows of an
example leave when it stops (EOS, token limit, repetition loop). With lambda = 1 at every step this
is exactly ordinary decoding of the plain context (`onsft.engine.decoding.generate` runs the same loop).

The mixing rule itself (`normalized_entropy`, `mixing_weight`, `mix_logprobs`) lives in
`onsft.formulas.mixing`, tested against float64 references; this module only supplies it to the shared
decoding loop as a per-step policy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from onsft.engine.decoding import Generation, SamplingConfig, decode_examples
from onsft.errors import UserError
from onsft.formulas.mixing import MODES, mix_logprobs, mixing_weight

ANSWER_MARKER = "\\boxed{"  # the hand-over marker of math answers (and of the organism)
MARKER_SEPARATOR = "|"  # several hand-over markers in one setting: "\\boxed{|answer is"
DEFAULT_BETA = 3.0  # the reference demo's entropy scale


def answer_markers(marker: str) -> tuple[str, ...]:
    """The hand-over markers of a setting: alternatives separated by `|`, the first one generated wins
    ('' = never hand over)."""
    return tuple(part for part in marker.split(MARKER_SEPARATOR) if part)


@dataclass
class HintedConfig(SamplingConfig):
    """Hinted decoding settings: the sampling fields of `SamplingConfig` (with the reference demo's
    defaults) plus the mixing rule and the answer marker."""

    RENAMED_FLAGS: ClassVar[dict[str, str]] = {"beta": "hint_beta"}  # old flag -> its name now (same setting)

    max_new_tokens: int = field(
        default=2048, metadata={"help": "Most tokens generated per example (the reference demo used 8192)."}
    )
    batch_size: int = field(default=16, metadata={"help": "Examples decoded together (two rows each)."})
    temperature: float = field(
        default=0.3, metadata={"help": "Sampling temperature of the mixed distribution; 0 = greedy."}
    )
    top_p: float = field(
        default=0.95, metadata={"help": "Nucleus sampling over the mixed distribution (after temperature; 1 = off)."}
    )
    # The flag is --hint_beta (train's --beta is DPO's); --beta, its old name, still works with a note on stderr.
    # The setting keeps its name `beta` in records and experiment files.
    beta: float | None = field(
        default=None,
        metadata={
            "aliases": ["--hint_beta"],
            "help": "--hint_beta: hinted decoding's entropy scale of lambda: 0 = hinted context alone (plain "
            f"self-distillation rewrite). Default: {DEFAULT_BETA} (the reference demo), or the model's rewrite "
            "profile when rewriting.",
        },
    )
    mode: Literal["linear", "sigmoid", "piecewise"] = field(
        default="linear",
        metadata={
            "help": "lambda as a function of the hinted entropy: linear "
            "clip(beta*h), sigmoid(beta*(h-center)), or piecewise."
        },
    )
    sigmoid_center: float = field(
        default=0.5, metadata={"help": "Normalised entropy at which sigmoid mode gives lambda = 0.5."}
    )
    piecewise_low: float = field(
        default=0.3, metadata={"help": "Piecewise mode: lambda = 0 at or below this normalised entropy."}
    )
    piecewise_high: float = field(
        default=0.7, metadata={"help": "Piecewise mode: lambda = 1 at or above this normalised entropy."}
    )
    answer_marker: str | None = field(
        default=None,
        metadata={
            "help": "Once generated, the plain context alone finishes the response ('' = never; several "
            "separated by |, e.g. '\\boxed{|answer is'). Default: the model folder's onsft.json or the model's "
            "rewrite profile when rewriting, else \\boxed{."
        },
    )
    marker_before_stop: bool | None = field(
        default=None,
        metadata={
            "help": "Mask EOS while the hinted context leads, so every response reaches an answer marker and its "
            "answer is written by the plain context (a response that never reaches one ends at --max_new_tokens "
            "and is not kept). Default: the model's rewrite profile, else false."
        },
    )
    lambda_override: float | None = field(
        default=None,
        metadata={
            "help": "Use this lambda at every step, the first included, instead of the "
            "entropy rule (tests and ablations; 1 = plain decoding)."
        },
    )

    def validate(self) -> None:
        super().validate()
        if self.mode not in MODES:
            raise UserError(f"unknown mode `{self.mode}`", where="config", fix=f"use one of {', '.join(MODES)}.")
        if self.beta is not None and self.beta < 0:
            raise UserError("`beta` must be >= 0", where="config", fix="set beta >= 0 (0 = hinted context alone).")
        if self.mode == "piecewise" and not self.piecewise_low < self.piecewise_high:
            raise UserError(
                "`piecewise_low` must be below `piecewise_high`",
                where="config",
                fix="set piecewise_low < piecewise_high.",
            )
        if self.lambda_override is not None and not 0 <= self.lambda_override <= 1:
            raise UserError("`lambda_override` must be in [0, 1]", where="config", fix="set it in [0, 1] or unset it.")


@dataclass
class HintedGeneration(Generation):
    """A hinted-decoding result. A step is *led* by the hinted context when lambda < 0.5 (its
    log-probs weigh more), else by the plain context; the first step counts as hinted-led and the
    steps after the hand-over as plain-led. `mean_lambda` averages lambda over all generated tokens
    (0 for a first token taken from the hinted context, 1 after the hand-over)."""

    hinted_led_steps: int = 0
    plain_led_steps: int = 0
    mean_lambda: float = 0.0
    handed_over: bool = False
    handover_step: int | None = None


def make_mixer(config: HintedConfig) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    def mixer(hinted_lp: torch.Tensor, plain_lp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if config.lambda_override is not None:
            lam = torch.full(hinted_lp.shape[:-1], float(config.lambda_override), device=hinted_lp.device)
        else:
            lam = mixing_weight(
                hinted_lp,
                DEFAULT_BETA if config.beta is None else config.beta,
                config.mode,
                sigmoid_center=config.sigmoid_center,
                piecewise_low=config.piecewise_low,
                piecewise_high=config.piecewise_high,
            )
        return mix_logprobs(hinted_lp, plain_lp, lam), lam

    return mixer


def hinted_decode(
    model,
    tokenizer,
    plain_ids: list[list[int]],
    hinted_ids: list[list[int]],
    config: HintedConfig | None = None,
    progress: Callable[[int], None] | None = None,
    **options,
) -> list[HintedGeneration]:
    """Decode one response per example shared by its plain and hinted prompts (token ids, already
    templated; any "analyse the reference first" prefix belongs to the hinted prompt). Batched with
    KV caches; results are in input order and do not depend on `batch_size` or the schedule.
    `options`: the keyword options of `decode_examples` (schedule, shared_prefix, example_ids, ...)."""
    config = config or HintedConfig()
    config.validate()
    traces = decode_examples(
        model,
        tokenizer,
        plain_ids,
        hinted_ids,
        config,
        mixer=make_mixer(config),
        answer_marker=answer_markers(ANSWER_MARKER if config.answer_marker is None else config.answer_marker),
        hinted_first=config.lambda_override is None,
        progress=progress,
        marker_before_stop=bool(config.marker_before_stop),
        **options,
    )
    results = []
    for trace in traces:
        hinted_led = sum(lam < 0.5 for lam in trace.lambdas)
        results.append(
            HintedGeneration(
                token_ids=trace.token_ids,
                text=tokenizer.decode(trace.token_ids, skip_special_tokens=True),
                finish_reason=trace.finish_reason,
                n_tokens=len(trace.token_ids),
                hinted_led_steps=hinted_led,
                plain_led_steps=len(trace.lambdas) - hinted_led,
                mean_lambda=sum(trace.lambdas) / max(len(trace.lambdas), 1),
                handed_over=trace.handover_step is not None,
                handover_step=trace.handover_step,
            )
        )
    return results
