"""Preference baselines: build DPO / SimPO pairs from the model's own samples, and train on them.

    onsft pairs --model organism --data train.jsonl --out pairs.jsonl --samples 8 [--rewrites rewrites.jsonl]
    onsft train --method dpo   --model organism --data pairs.jsonl --output_dir runs/dpo
    onsft train --method simpo --model organism --data pairs.jsonl --output_dir runs/simpo

Pairs (the paper's baseline): for each prompt the model samples `--samples` responses, each checked by
the verifier against the row's `answer`. rejected = one of the model's own wrong samples; chosen = a
verified correct response, taken in this order: one of the model's own correct samples (on-policy);
else the rewritten response for that row from `--rewrites` (e.g. `onsft rewrite` output); else the
row's reference response (`completion` / last assistant turn). Rewritten and reference responses are
verified too and used only when they pass. A prompt yields no pair when every sample is correct (no
rejected) or nothing correct is found (no chosen). Up to `--pairs_per_prompt` pairs per prompt, each
with a different wrong sample.

Output rows use TRL's conversational preference format by default:
    {"prompt": [{"role": "user", ...}], "chosen": [{"role": "assistant", "content": ...}],
     "rejected": [{"role": "assistant", "content": ...}], + provenance}
(`--format standard`: the prompt rendered with the chat template as text, chosen / rejected as text.)
Provenance: `chosen_source` (own_sample | rewrite | reference), `source_index` (row of --data),
`n_samples`, `n_correct`, `rejected_finish_reason`, and the row's `id`, `task` and `answer` when present.
Every sample with its verdict goes to `<out stem>.samples.jsonl` and counts to `<out stem>.summary.json`.
Sampling is resumable like `onsft eval` (rerun the same command after a kill).

Training: DPO is TRL's `DPOTrainer` (sigmoid loss against a frozen copy of the starting model as the
reference; with LoRA the reference is the model with adapters disabled). SimPO is reference-free:
loss = -log sigmoid(beta * (mean log p(chosen) - mean log p(rejected)) - gamma), with per-token mean
log-probabilities (length-normalised rewards) and a target margin gamma. TRL 1.16 provides it as
`trl.experimental.cpo.CPOTrainer` with loss_type="simpo" and cpo_alpha=0 (no behaviour-cloning term);
`DPOTrainer` has no SimPO loss. Defaults: beta 0.1 for DPO, 2.0 for SimPO (the SimPO paper's range
starts there), gamma 0.5. Checkpoints, resume, the final model in `<output_dir>/model` and the summary
JSON work as in `onsft train`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from trl import DPOConfig

from onsft.config import parse_command
from onsft.data import Example, encode_prompt, encode_response, load_examples, read_rows
from onsft.errors import UserError
from onsft.records import ResumableJsonl, check_writable, write_json_atomic, write_jsonl_atomic

FORMATS = ("conversational", "standard")
PREFERENCE_METHODS = ("dpo", "simpo")


# ---------------------------------------------------------------------------------------------- pairs


@dataclass
class PairsConfig:
    model: str = field(default="organism", metadata={"help": "Model whose own samples make the pairs."})
    data: str = field(
        default="",
        metadata={
            "help": "Prompts with an `answer` column (and optionally a reference "
            "response: `completion` or a final assistant turn)."
        },
    )
    out: str = field(default="pairs.jsonl", metadata={"help": "Output JSONL of preference pairs."})
    rewrites: str | None = field(
        default=None,
        metadata={
            "help": "Rewritten responses (e.g. `onsft rewrite` output) used as chosen when no own sample is correct. "
            "Rows are matched to --data by `id` when both have one, else by prompt text."
        },
    )
    rewrite_field: str | None = field(
        default=None,
        metadata={"help": "Column of --rewrites holding the response (default: `completion` / last assistant turn)."},
    )
    use_reference: bool = field(
        default=True, metadata={"help": "Fall back to the data's own reference response as chosen when it verifies."}
    )
    verifier: str = field(default="math", metadata={"help": "math | exact | module:function | file.py:function."})
    verify_timeout: int = field(default=5, metadata={"help": "Seconds math-verify may spend per parse / comparison."})
    samples: int = field(default=8, metadata={"help": "Own samples per prompt."})
    pairs_per_prompt: int = field(default=1, metadata={"help": "Most pairs per prompt (distinct wrong samples)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling (1 = off)."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0 = off)."})
    max_new_tokens: int = field(default=512, metadata={"help": "Most tokens per sample."})
    batch_size: int = field(default=16, metadata={"help": "Sequences decoded together."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})
    limit: int = field(default=0, metadata={"help": "Use only the first N rows of --data (0 = all)."})
    format: str = field(default="conversational", metadata={"help": "conversational (TRL chat) or standard (text)."})

    def eval_config(self):
        from onsft.evaluate import EvalConfig

        return EvalConfig(
            model=self.model,
            data=self.data,
            verifier=self.verifier,
            verify_timeout=self.verify_timeout,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            greedy=False,
            samples=self.samples,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            plot=False,
        )

    def validate(self) -> None:
        if self.samples < 1:
            raise UserError("`samples` must be at least 1", where="command line", fix="pass --samples 8 or so.")
        if self.pairs_per_prompt < 1:
            raise UserError("`pairs_per_prompt` must be at least 1", where="command line", fix="pass a positive value.")
        if self.format not in FORMATS:
            raise UserError(
                f"unknown --format `{self.format}`", where="command line", fix=f"use {' or '.join(FORMATS)}."
            )
        self.eval_config().validate()


def _prompt_key(example: Example) -> str:
    return json.dumps(example.prompt, sort_keys=True, ensure_ascii=False)


def _load_rewrites(path: str, column: str | None) -> dict[str, list[str]]:
    """Rewritten responses by key: `id:<id>` and `prompt:<turns>` (a row may carry several)."""
    examples = load_examples(path, require_response=column is None)
    found: dict[str, list[str]] = {}
    for example in examples:
        response = example.response if column is None else example.record.get(column)
        if response is None:
            raise UserError(
                f"rewrite row has no `{column}` column",
                where=path,
                line=example.line,
                fix="name the response column with --rewrite_field.",
            )
        if not isinstance(response, str) or not response.strip():
            continue
        keys = [f"prompt:{_prompt_key(example)}"]
        if example.record.get("id") is not None:
            keys.append(f"id:{example.record['id']}")
        for key in keys:
            found.setdefault(key, []).append(response)
    return found


def make_pairs(
    row: dict,
    example: Example,
    candidates: list[tuple[str, str]],
    verifier,
    pairs_per_prompt: int,
    tokenizer=None,
    fmt: str = "conversational",
) -> tuple[list[dict], str]:
    """Pairs of one evaluated row (its `samples`, each with `correct`). `candidates` are (source, text)
    fallbacks for chosen, tried in order and used only when the verifier accepts them.
    Returns (pairs, outcome) where outcome names why a prompt gave no pair."""
    samples = row.get("samples", [])
    wrong, seen = [], set()
    for sample in samples:
        if not sample["correct"] and sample["text"] not in seen and sample["text"].strip():
            seen.add(sample["text"])
            wrong.append(sample)
    if not wrong:
        # Empty wrong samples (e.g. only special tokens) make no useful rejected response.
        return [], "all_samples_correct" if all(s["correct"] for s in samples) else "wrong_samples_empty"
    chosen = list(dict.fromkeys(s["text"] for s in samples if s["correct"]))
    source = "own_sample"
    if not chosen:
        verified = next(((s, t) for s, t in candidates if t and t.strip() and verifier(t, example.answer)), None)
        if verified is None:
            return [], "no_correct_response"
        source, chosen = verified[0], [verified[1]]
    pairs = []
    for good, bad in zip(itertools.cycle(chosen), wrong[:pairs_per_prompt]):
        pair = _format_pair(example.prompt, good, bad["text"], tokenizer, fmt)
        pair.update(
            chosen_source=source,
            source_index=example.index,
            n_samples=len(samples),
            n_correct=sum(s["correct"] for s in samples),
            rejected_finish_reason=bad["finish_reason"],
        )
        for key in ("id", "task"):
            if example.record.get(key) is not None:
                pair[key] = example.record[key]
        if example.answer is not None:
            pair["answer"] = example.answer
        pairs.append(pair)
    return pairs, f"pair_from_{source}"


def _format_pair(prompt: list[dict], chosen: str, rejected: str, tokenizer, fmt: str) -> dict:
    if fmt == "conversational":
        return {
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        }
    text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    return {"prompt": text, "chosen": chosen, "rejected": rejected}


def build_pairs(config: PairsConfig) -> dict:
    """The `onsft pairs` command: sample, verify, pair, write; returns the summary."""
    from onsft.evaluate import _check_answers, _evaluate_rows, _finished
    from onsft.models import load_model, load_tokenizer
    from onsft.verify import get_verifier

    config.validate()
    if not config.data:
        raise UserError("no data given", where="command line", fix="pass --data FILE.")
    out = Path(config.out)
    check_writable(out)
    verifier = get_verifier(config.verifier, timeout_seconds=config.verify_timeout)
    examples = load_examples(config.data, require_response=False)
    if config.limit:
        examples = examples[: config.limit]
    _check_answers(examples, config.data)
    rewrites = _load_rewrites(config.rewrites, config.rewrite_field) if config.rewrites else {}
    samples_path = out.with_name(out.stem + ".samples.jsonl")
    summary_path = out.with_name(out.stem + ".summary.json")
    settings = {
        k: v
        for k, v in dataclasses.asdict(config).items()
        if k
        in (
            "model",
            "data",
            "verifier",
            "samples",
            "temperature",
            "top_p",
            "top_k",
            "max_new_tokens",
            "batch_size",
            "seed",
            "limit",
        )
    }
    finished = _finished(summary_path, {**dataclasses.asdict(config), "out": str(out)})
    if finished is not None and out.exists():
        print(f"onsft: {out} already holds these pairs; nothing to do.", file=sys.stderr)
        return finished
    tokenizer = load_tokenizer(config.model)
    # A tokenizer without a chat template fails here, before the model loads and any output file exists.
    encode_prompt(tokenizer, examples[0].prompt, config.data)
    model = load_model(config.model)
    started = time.time()
    eval_config = config.eval_config()
    store = ResumableJsonl(samples_path, fingerprint={"part": "pairs", **settings})
    rows = _evaluate_rows(model, tokenizer, examples, eval_config, verifier, store, desc="pairs", where=config.data)
    pairs, outcomes = [], Counter()
    for row, example in zip(rows, examples):
        candidates = []
        if rewrites:
            keys = ([f"id:{example.record['id']}"] if example.record.get("id") is not None else []) + [
                f"prompt:{_prompt_key(example)}"
            ]
            texts = next((rewrites[k] for k in keys if k in rewrites), [])
            candidates += [("rewrite", t) for t in texts]
        if config.use_reference and example.response:
            candidates.append(("reference", example.response))
        made, outcome = make_pairs(
            row, example, candidates, verifier, config.pairs_per_prompt, tokenizer, config.format
        )
        pairs += made
        outcomes[outcome] += 1
    summary = {
        "prompts": len(examples),
        "pairs": len(pairs),
        "outcomes": dict(sorted(outcomes.items())),
        "chosen_sources": dict(Counter(p["chosen_source"] for p in pairs)),
        "mean_sample_accuracy": sum(r["n_correct"] for r in rows) / max(1, config.samples * len(rows)),
        "samples_file": str(samples_path),
        "wall_seconds_this_run": time.time() - started,
        "config": dataclasses.asdict(config),
        "settings": {**dataclasses.asdict(config), "out": str(out)},
    }
    # The samples are complete and worth keeping even when no pair came out of them.
    store.finalize(order=range(len(examples)))
    write_json_atomic(summary_path, summary)
    if not pairs:
        raise UserError(
            f"no preference pairs from {len(examples)} prompts ({dict(outcomes)})",
            where=config.data,
            fix="a pair needs a wrong own sample and a correct response: raise --samples or "
            "--temperature, or give reference responses / --rewrites for prompts the model fails.",
        )
    write_jsonl_atomic(out, pairs)
    return summary


# ------------------------------------------------------------------------------------------- training


@dataclass
class PreferenceTrainConfig(DPOConfig):
    """TRL's DPOConfig (every TrainingArguments field works) plus SimPO's margin. Changed defaults say why."""

    output_dir: str | None = field(default="runs/preference", metadata={"help": "Checkpoints and the model go here."})
    beta: float | None = field(
        default=None,
        metadata={
            "help": "DPO: strength of the pull to the reference (default 0.1). SimPO: reward scale (default 2.0)."
        },
    )
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO target reward margin gamma."})
    # Recomputing activations costs ~20-30% time; small models and CPUs rarely need the memory.
    activation_checkpointing: bool | None = field(
        default=False, metadata={"help": "Trade compute for activation memory."}
    )
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Deprecated alias of activation_checkpointing."}
    )
    report_to: None | str | list[str] = field(default="none", metadata={"help": "Experiment trackers (wandb, ...)."})
    save_strategy: str = field(default="steps", metadata={"help": "When to checkpoint (resumable): steps|epoch|no."})
    save_steps: float = field(default=50, metadata={"help": "Checkpoint every N optimiser steps."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep only the last N checkpoints."})
    bf16: bool | None = field(
        default=None,
        metadata={"help": "bf16 mixed precision; default: on where a GPU supports it, off on CPU-only machines."},
    )
    include_num_input_tokens_seen: str = field(
        default="non_padding", metadata={"help": "Count tokens processed (no | all | non_padding)."}
    )

    def __post_init__(self):
        from onsft.trainer import resolve_precision

        resolve_precision(self)
        super().__post_init__()


def _as_messages(value, column: str, where: str, line: int, role: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if (
        isinstance(value, list)
        and value
        and all(
            isinstance(t, dict) and isinstance(t.get("content"), str) and isinstance(t.get("role"), str) for t in value
        )
    ):
        return [{"role": t["role"], "content": t["content"]} for t in value]
    raise UserError(
        f"column `{column}` must be text or a list of {{role, content}} turns",
        where=where,
        line=line,
        fix="write pairs as `onsft pairs` does (TRL's preference format).",
    )


def load_pairs(path: str, tokenizer, max_length: int | None, overlong: str = "reject"):
    """Validated pairs as a `datasets.Dataset` with prompt / chosen / rejected, and counts. Every problem
    (no pairs, a missing column, a row over `max_length` under `reject`) is a `UserError` naming the line."""
    import datasets

    rows = read_rows(path)
    if not rows:
        raise UserError("pairs file has no pairs", where=path, fix="run `onsft pairs` (it says why no pair was made).")
    if overlong not in ("reject", "truncate", "drop"):
        raise UserError(
            f"unknown --overlong value `{overlong}`", where="command line", fix="use reject, truncate or drop."
        )
    table = {"prompt": [], "chosen": [], "rejected": []}
    stats = Counter(rows=len(rows))
    too_long: list[tuple[int, int]] = []
    standard = None
    for line, row in rows:
        if not isinstance(row, dict) or any(row.get(k) is None for k in table):
            missing = [k for k in table if not isinstance(row, dict) or row.get(k) is None]
            raise UserError(
                f"pair has no {', '.join(f'`{k}`' for k in missing)}",
                where=path,
                line=line,
                fix="every row needs prompt, chosen and rejected.",
            )
        is_standard = all(isinstance(row[k], str) for k in table)
        if standard is None:
            standard = is_standard
        elif standard != is_standard:
            raise UserError(
                "pairs mix the standard (text) and conversational (turns) formats",
                where=path,
                line=line,
                fix="write every row in one format.",
            )
        if is_standard:
            prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            lengths = [
                len(tokenizer(prompt + r, add_special_tokens=False)["input_ids"]) + 1 for r in (chosen, rejected)
            ]
            texts = (chosen, rejected)
        else:
            prompt = _as_messages(row["prompt"], "prompt", path, line, "user")
            chosen = _as_messages(row["chosen"], "chosen", path, line, "assistant")
            rejected = _as_messages(row["rejected"], "rejected", path, line, "assistant")
            ids = encode_prompt(tokenizer, prompt, path)
            texts = (chosen[-1]["content"], rejected[-1]["content"])
            lengths = [len(ids) + len(encode_response(tokenizer, prompt, t, ids)) for t in texts]
        if not all(t.strip() for t in texts):
            raise UserError(
                "chosen or rejected response is empty",
                where=path,
                line=line,
                fix="remove the row or give it non-empty responses.",
            )
        stats["identical"] += int(texts[0] == texts[1])
        if max_length is not None and max(lengths) > max_length:
            if overlong == "reject":
                too_long.append((line, max(lengths)))
                continue
            if overlong == "drop" or len(ids) >= max_length:
                stats["dropped"] += 1
                continue
            stats["truncated"] += 1
        table["prompt"].append(prompt)
        table["chosen"].append(chosen)
        table["rejected"].append(rejected)
    if too_long:
        line, n = too_long[0]
        raise UserError(
            f"{len(too_long)} of {len(rows)} pairs are longer than max_length={max_length} (first: {n} tokens)",
            where=path,
            line=line,
            fix="raise --max_length, or pass --overlong truncate (cut responses) or drop (skip pairs).",
        )
    if not table["prompt"]:
        raise UserError(
            "no pairs left to train on after dropping over-long pairs", where=path, fix="raise --max_length."
        )
    return datasets.Dataset.from_dict(table), dict(stats)


def _simpo_config(args):
    """The parsed DPO-style config as TRL's CPOConfig for SimPO (loss_type simpo, no BC term)."""
    from trl.experimental.cpo import CPOConfig

    def default(f: dataclasses.Field):
        return f.default_factory() if f.default is dataclasses.MISSING else f.default

    cpo_fields = {f.name for f in dataclasses.fields(CPOConfig) if f.init}
    # Options SimPO has no use for (reference model, DPO loss variants) must not be silently ignored;
    # pad_to_multiple_of and truncation_mode are rewritten by DPOConfig itself, so they are not compared.
    unused = [
        f.name
        for f in dataclasses.fields(DPOConfig)
        if f.init
        and f.name not in cpo_fields
        and f.name not in ("pad_to_multiple_of", "truncation_mode")
        and getattr(args, f.name) != default(f)
    ]
    if list(args.loss_type) != ["sigmoid"]:
        unused.append("loss_type")
    if unused:
        raise UserError(
            f"option(s) {', '.join('--' + n for n in unused)} do not apply to SimPO",
            where="command line",
            fix="drop them, or use --method dpo.",
        )
    values = {name: getattr(args, name) for name in cpo_fields if hasattr(args, name)}
    values.update(
        loss_type="simpo", cpo_alpha=0.0, simpo_gamma=args.simpo_gamma, beta=2.0 if args.beta is None else args.beta
    )
    return CPOConfig(**values)


def train_preference(argv: list[str] | None) -> dict:
    """`onsft train --method dpo|simpo`: validate the pairs, train, save `<output_dir>/model`, return the summary."""
    import torch

    from onsft.models import load_model, load_tokenizer
    from onsft.train import TrainInputs, _finished_run, _last_checkpoint, _peft_config, _save_final

    inputs, args = parse_command(argv, TrainInputs, PreferenceTrainConfig, prog="onsft train")
    if inputs.method not in PREFERENCE_METHODS:
        raise UserError(
            f"method `{inputs.method}` is not a preference method",
            where="command line",
            fix=f"use --method {' or '.join(PREFERENCE_METHODS)} (sft runs through onsft.train).",
        )
    if not inputs.data:
        raise UserError("no pairs given", where="command line", fix="pass --data pairs.jsonl (from `onsft pairs`).")
    if args.beta is not None and args.beta <= 0:
        raise UserError("beta must be > 0", where="command line", fix="pass a positive --beta.")
    if inputs.method == "simpo":
        trainer_args = _simpo_config(args)
    else:
        trainer_args = args
        trainer_args.beta = 0.1 if args.beta is None else args.beta
    check_writable(Path(args.output_dir) / "train_summary.json")
    run_args = {k: v for k, v in args.to_dict().items() if k not in ("output_dir", "logging_dir")}
    settings = json.loads(json.dumps({"inputs": vars(inputs), "args": run_args}, sort_keys=True, default=str))
    finished = _finished_run(Path(args.output_dir), settings)
    if finished is not None:
        print(f"onsft: {args.output_dir} already holds this finished run; nothing to do.", file=sys.stderr)
        return finished
    tokenizer = load_tokenizer(inputs.model)
    train_set, stats = load_pairs(inputs.data, tokenizer, args.max_length, inputs.overlong)
    eval_set = (
        load_pairs(inputs.eval_data, tokenizer, args.max_length, inputs.overlong)[0] if inputs.eval_data else None
    )
    if eval_set is not None and trainer_args.eval_strategy == "no":
        trainer_args.eval_strategy = "steps"
        trainer_args.eval_steps = trainer_args.eval_steps or trainer_args.save_steps
    model = load_model(inputs.model)
    peft_config = _peft_config(inputs)
    common = dict(
        args=trainer_args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    if inputs.method == "dpo":
        import copy

        from trl import DPOTrainer

        # The reference is the starting model, frozen. A copy also works for models built in memory (TRL
        # would reload one from the hub path in the config). With LoRA, disabling adapters gives it for free.
        reference = None if peft_config is not None else copy.deepcopy(model).eval().requires_grad_(False)
        trainer = DPOTrainer(model=model, ref_model=reference, **common)
    else:
        from trl.experimental.cpo import CPOTrainer

        trainer = CPOTrainer(model=model, **common)
    resume_from = _last_checkpoint(args.output_dir) if inputs.resume else None
    started = time.time()
    result = trainer.train(resume_from_checkpoint=resume_from)
    summary = {
        "method": inputs.method,
        "model": inputs.model,
        "data": inputs.data,
        "global_step": trainer.state.global_step,
        "resumed_from": resume_from,
        "train_loss": result.training_loss,
        "wall_seconds_this_run": time.time() - started,
        "pairs": stats.get("rows", 0),
        "dropped_overlong": stats.get("dropped", 0),
        "truncated_overlong": stats.get("truncated", 0),
        "identical_pairs": stats.get("identical", 0),
        "beta": trainer_args.beta,
        "simpo_gamma": args.simpo_gamma if inputs.method == "simpo" else None,
        "trainer": type(trainer).__name__,
        "tokens_seen": trainer.state.num_input_tokens_seen,
        "torch": torch.__version__,
        "settings": settings,
    }
    if trainer.is_world_process_zero():
        _save_final(trainer, tokenizer, Path(args.output_dir), inputs)
        write_jsonl_atomic(Path(args.output_dir) / "metrics.jsonl", trainer.state.log_history)
        write_json_atomic(Path(args.output_dir) / "train_summary.json", summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    (config,) = parse_command(argv, PairsConfig, prog="onsft pairs")
    summary = build_pairs(config)
    print(json.dumps({k: summary[k] for k in ("prompts", "pairs", "outcomes", "chosen_sources")}))
    return 0
