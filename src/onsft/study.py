"""A small end-to-end study on reasoning-gym tasks: audit, hinted rewriting, training, evaluation.

    python -m onsft.study --model smollm2-135m --out docs/study-smollm2 --work runs/study-smollm2 --threads 1

Any local Hugging Face causal LM with a chat template works as --model (a folder, a .gguf, a cached Hub
name, or an alias of `onsft.models`); a GGUF model is first written out once as a plain float32
folder under --work, because training saves the model and a GGUF-quantised model cannot be saved.

Steps (every one cached under --work, so a killed run rerun with the same options continues):
  1. data: `n_train` rows of --task (worked solutions as references) and of --simple_task, test rows of
     both from another seed (prompts seen in training removed), and --retention_task rows: a skill that
     is not trained, whose accuracy and KL drift measure forgetting.
  2. audit: the model's own samples on the training prompts (temperature 1, full vocabulary) and the
     references, scored with DDT (mean phi, Z = sum phi / sqrt(sum Var), p-value). Own samples are the
     calibration set: mean phi ~ 0 and Z ~ N(0,1) if the theory holds.
  3. rewrite: hinted decoding (`onsft.rewrite`, own_samples=0 so every prompt is rewritten, beta 3,
     temperature 0.3), verified against the gold answer. The training set "rewrite" is the spec's
     pipeline: the own sample where it was correct, else the verified rewrite, else nothing.
  4. train: LoRA runs of `onsft.train` for each --methods entry `loss:data` (loss nll|dft|idft, data
     reference|rewrite), all with the same steps, batch and learning rate.
  5. evaluate: greedy accuracy (math-verify) on both tasks' test rows and on the retention task, and
     KL(base || tuned) on the base model's greedy continuations of retention prompts
     (`onsft.evaluate.kl_drift`).
Outputs in --out: results.json (every number), results.md (the tables), z_calibration.png, mean_phi.png,
accuracy.png. Timings are wall-clock seconds of this machine, per step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from onsft.config import parse_command
from onsft.errors import UserError
from onsft.records import atomic_directory, write_json_atomic, write_jsonl_atomic

DATA_KINDS = ("reference", "rewrite")


@dataclass
class StudyConfig:
    model: str = field(
        default="smollm2-135m", metadata={"help": "Model: alias, local folder, .gguf or cached Hub name."}
    )
    out: str = field(default="docs/study-smollm2", metadata={"help": "Folder for results.json/.md and the plots."})
    work: str = field(default="runs/study-smollm2", metadata={"help": "Folder for data, caches and trained models."})
    task: str = field(default="gsm_symbolic", metadata={"help": "Main reasoning-gym task (needs worked solutions)."})
    task_options: list[str] = field(default_factory=list, metadata={"help": "Its options, key=value."})
    simple_task: str = field(default="chain_sum", metadata={"help": "Simpler task trained alongside."})
    simple_options: list[str] = field(
        default_factory=lambda: ["max_terms=3", "max_digits=2"], metadata={"help": "Its options, key=value."}
    )
    retention_task: str = field(default="products", metadata={"help": "Held-out task: forgetting is measured here."})
    retention_options: list[str] = field(
        default_factory=lambda: ["max_digits=1"], metadata={"help": "Its options, key=value."}
    )
    n_train: int = field(default=32, metadata={"help": "Training rows per task (task and simple task)."})
    n_test: int = field(default=32, metadata={"help": "Test rows per task."})
    n_retention: int = field(default=32, metadata={"help": "Retention-task test rows."})
    n_kl: int = field(default=16, metadata={"help": "Retention prompts whose base continuations measure KL drift."})
    max_new_tokens: int = field(default=128, metadata={"help": "Generation limit on the main task."})
    simple_max_new_tokens: int = field(default=48, metadata={"help": "Generation limit on the simple task."})
    retention_max_new_tokens: int = field(default=32, metadata={"help": "Generation limit on the retention task."})
    kl_max_new_tokens: int = field(default=32, metadata={"help": "Length of the base continuations for KL."})
    methods: list[str] = field(
        default_factory=lambda: ["nll:reference", "nll:rewrite", "idft:rewrite"],
        metadata={"help": "Training runs as loss:data (loss nll|dft|idft; data reference|rewrite)."},
    )
    beta: float = field(default=3.0, metadata={"help": "Hinted decoding's entropy scale (0 = hinted context alone)."})
    rewrite_temperature: float = field(default=0.3, metadata={"help": "Hinted decoding temperature."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (0 = full fine-tuning)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    max_steps: int = field(default=24, metadata={"help": "Optimiser steps per training run."})
    batch_size: int = field(default=4, metadata={"help": "Rows per optimiser step."})
    learning_rate: float = field(default=3e-4, metadata={"help": "Peak learning rate (cosine, 10% warm-up)."})
    max_length: int = field(default=512, metadata={"help": "Most tokens of prompt + response in training/scoring."})
    gen_batch_size: int = field(default=64, metadata={"help": "Sequences decoded together."})
    seed: int = field(default=0, metadata={"help": "Seed of data, sampling and training."})
    threads: int = field(
        default=0,
        metadata={
            "help": "torch CPU threads (0 = torch's default). On a shared, "
            "busy machine 1 can be several times faster than 2."
        },
    )

    def validate(self) -> None:
        for name in (
            "n_train",
            "n_test",
            "n_retention",
            "n_kl",
            "max_new_tokens",
            "simple_max_new_tokens",
            "retention_max_new_tokens",
            "kl_max_new_tokens",
            "max_steps",
            "batch_size",
            "gen_batch_size",
        ):
            if getattr(self, name) < 1:
                raise UserError(f"`{name}` must be >= 1", where="command line", fix=f"pass a positive --{name}.")
        for method in self.methods:
            loss, _, data = method.partition(":")
            if loss not in ("nll", "dft", "idft") or data not in DATA_KINDS:
                raise UserError(
                    f"method `{method}` is not loss:data",
                    where="--methods",
                    fix="write e.g. nll:reference idft:rewrite (loss nll|dft|idft, data reference|rewrite).",
                )


# ----------------------------------------------------------------------------------------- caching


def _fingerprint(config: StudyConfig, *names: str) -> str:
    values = {n: getattr(config, n) for n in names}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:12]


DATA_FIELDS = (
    "model",
    "task",
    "task_options",
    "simple_task",
    "simple_options",
    "retention_task",
    "retention_options",
    "n_train",
    "n_test",
    "n_retention",
    "seed",
)


class Cache:
    """One JSON file per finished step under work/cache, named by the step and the settings it depends on."""

    def __init__(self, folder: Path):
        self.folder = folder

    def get(self, name: str, compute, timings: dict):
        path = self.folder / f"{name}.json"
        if path.is_file():
            saved = json.loads(path.read_text(encoding="utf-8"))
            timings[name] = saved["seconds"]
            return saved["value"]
        started = time.time()
        value = compute()
        seconds = time.time() - started
        write_json_atomic(path, {"seconds": seconds, "value": value})
        timings[name] = seconds
        print(f"onsft study: {name} done in {seconds:.0f} s", file=sys.stderr, flush=True)
        return value


# -------------------------------------------------------------------------------------------- data


def make_data(config: StudyConfig) -> dict[str, list[dict]]:
    from onsft.datasets_cli import parse_options
    from onsft.gym import gym_rows

    main_opts, simple_opts = parse_options(config.task_options), parse_options(config.simple_options)
    train = gym_rows(config.task, config.n_train, config.seed, options=main_opts, metadata=False) + gym_rows(
        config.simple_task, config.n_train, config.seed, options=simple_opts, metadata=False
    )
    missing = [r["id"] for r in train if "reference" not in r]
    if missing:
        raise UserError(
            f"{len(missing)} training rows have no reference (first: {missing[0]})",
            where="--task",
            fix="pick tasks with worked solutions (gsm_symbolic, chain_sum).",
        )
    seen = {r["prompt"] for r in train}
    test = {}
    for key, task, opts in (("test_task", config.task, main_opts), ("test_simple", config.simple_task, simple_opts)):
        # A larger draw from another seed, so dropping prompts seen in training still leaves n_test rows.
        rows = [
            r
            for r in gym_rows(task, 2 * config.n_test, config.seed + 1, options=opts, metadata=False)
            if r["prompt"] not in seen
        ]
        test[key] = [
            {k: v for k, v in r.items() if k in ("id", "task", "prompt", "answer")} for r in rows[: config.n_test]
        ]
    retention = gym_rows(
        config.retention_task,
        config.n_retention,
        config.seed + 2,
        options=parse_options(config.retention_options),
        metadata=False,
    )
    return {
        "train": train,
        **test,
        "retention": [{k: r[k] for k in ("id", "task", "prompt", "answer")} for r in retention],
    }


def _examples(rows: list[dict], require_response: bool = False):
    from onsft.data import parse_example

    return [parse_example(row, i, i + 1, "study", require_response) for i, row in enumerate(rows)]


# ------------------------------------------------------------------------------------------ models


def materialize(model: str, folder: Path) -> str:
    """A path `from_pretrained` and `save_pretrained` both handle: the model's own folder, or for a GGUF
    model a float32 copy written once into `folder`."""
    from onsft.models import load_model, load_tokenizer, resolve_model_path

    path = Path(resolve_model_path(model))
    is_gguf = path.suffix == ".gguf" or (path.is_dir() and not (path / "config.json").is_file())
    if not is_gguf:
        return str(path)
    if (folder / "config.json").is_file():
        return str(folder)
    weights, tokenizer = load_model(model), load_tokenizer(model)
    # transformers marks a GGUF-loaded model as quantised and refuses to save it; its weights are
    # already dequantised float32, so the plain model is what we save.
    weights.hf_quantizer = None
    if hasattr(weights.config, "quantization_config"):
        del weights.config.quantization_config
    with atomic_directory(folder) as tmp:
        weights.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return str(folder)


# ------------------------------------------------------------------------------------------- audit


def _scorer(model, tokenizer):
    from onsft.audit import Scorer, pad_token_id

    return Scorer(model, [1.0], pad_id=pad_token_id(tokenizer), batch_size=16, max_batch_tokens=8192)


def _score_items(scorer, items) -> list[dict]:
    keep = ("mean_phi", "z", "p_value", "n_tokens", "sum_phi", "sum_var")
    out: dict[int, dict] = {}
    for batch, rows, _ in scorer.iter_scored(items):
        for i, row in zip(batch, rows):
            out[i] = {k: row[k] for k in keep}
    return [out[i] for i in range(len(items))]


def score_texts(model, tokenizer, rows: list[dict], responses: list[str], max_length: int) -> list[dict]:
    """DDT scores of text responses under each row's plain chat prompt."""
    from onsft.audit import encode_items

    examples = _examples([{**r, "completion": text} for r, text in zip(rows, responses)], require_response=True)
    items, _ = encode_items(tokenizer, examples, max_length, "truncate", "study")
    return _score_items(_scorer(model, tokenizer), items)


def own_samples(model, tokenizer, rows: list[dict], config: StudyConfig) -> list[dict]:
    """The model's own samples (temperature 1) per training row, scored on their sampled token ids,
    and verified against the gold answer."""
    from onsft.audit import Item, sample_responses
    from onsft.data import encode_prompt
    from onsft.verify import get_verifier

    verifier = get_verifier("math")
    results: list[dict | None] = [None] * len(rows)
    for task, limit in ((config.task, config.max_new_tokens), (config.simple_task, config.simple_max_new_tokens)):
        positions = [i for i, r in enumerate(rows) if r["task"] == task]
        for start in range(0, len(positions), config.gen_batch_size):
            chunk = positions[start : start + config.gen_batch_size]
            prompts = [encode_prompt(tokenizer, [{"role": "user", "content": rows[i]["prompt"]}]) for i in chunk]
            samples = sample_responses(model, tokenizer, prompts, limit, seed=config.seed * 1_000_003 + chunk[0])
            items = [Item(k, p + ids, len(p)) for k, (p, (ids, _, _)) in enumerate(zip(prompts, samples))]
            scores = _score_items(_scorer(model, tokenizer), items)
            for i, (_, text, finish), score in zip(chunk, samples, scores):
                results[i] = {
                    "text": text,
                    "finish_reason": finish,
                    "correct": verifier(text, rows[i]["answer"]),
                    **score,
                }
    return results


# ----------------------------------------------------------------------------------------- rewrite


def rewrite(model, tokenizer, rows: list[dict], config: StudyConfig) -> list[dict] | None:
    """Hinted-decoding records per training row (onsft.rewrite), or None when that module is absent."""
    try:
        from onsft.rewrite import RewriteConfig, rewrite_examples
    except ImportError:
        return None
    records: list[dict | None] = [None] * len(rows)
    for task, limit in ((config.task, config.max_new_tokens), (config.simple_task, config.simple_max_new_tokens)):
        positions = [i for i, r in enumerate(rows) if r["task"] == task]
        settings = RewriteConfig(
            model=config.model,
            data="study",
            own_samples=0,
            beta=config.beta,
            temperature=config.rewrite_temperature,
            max_new_tokens=limit,
            seed=config.seed,
            chunk_size=config.gen_batch_size,
            hinted_batch_size=config.gen_batch_size,
            max_length=config.max_length,
            progress=False,
        )
        done = rewrite_examples(model, tokenizer, _examples([rows[i] for i in positions]), settings, verifier="math")
        for i, record in zip(positions, done):
            records[i] = {
                k: record.get(k)
                for k in (
                    "response",
                    "provenance",
                    "verified",
                    "finish_reason",
                    "n_tokens",
                    "mean_lambda",
                    "extracted_answer",
                )
            }
    # Scored here like the references (same scorer, same fields), not with rewrite's own summary numbers.
    scored = [i for i, r in enumerate(records) if r["response"]]
    scores = score_texts(
        model, tokenizer, [rows[i] for i in scored], [records[i]["response"] for i in scored], config.max_length
    )
    for i, score in zip(scored, scores):
        records[i]["score"] = score
    return records


def rewrite_training_rows(rows: list[dict], own: list[dict], records: list[dict]) -> list[dict]:
    """The spec's pipeline: a correct own sample is kept as is; else a verified rewrite; else the row is dropped."""
    out = []
    for row, sample, record in zip(rows, own, records):
        base = {k: row[k] for k in ("id", "task", "prompt", "answer")}
        if sample["correct"]:
            out.append({**base, "completion": sample["text"], "provenance": "own"})
        elif record["provenance"] == "hinted" and record["verified"]:
            out.append({**base, "completion": record["response"], "provenance": "hinted"})
    return out


# -------------------------------------------------------------------------------------- evaluation


def evaluate(model, tokenizer, data: dict, config: StudyConfig, base=None) -> dict:
    from onsft.data import encode_prompt
    from onsft.evaluate import EvalConfig, evaluate_model, kl_drift

    result = {}
    for key, limit in (
        ("test_task", config.max_new_tokens),
        ("test_simple", config.simple_max_new_tokens),
        ("retention", config.retention_max_new_tokens),
    ):
        settings = EvalConfig(max_new_tokens=limit, batch_size=config.gen_batch_size, verifier="math")
        metrics = evaluate_model(model, tokenizer, _examples(data[key]), settings, return_records=True)
        result[key] = {
            "accuracy": metrics["accuracy"],
            "n": metrics["n"],
            "finish_reasons": metrics["finish_reasons"],
            "examples": [
                {"prompt": r["prompt"], "answer": r["answer"], "generation": r["generation"], "correct": r["correct"]}
                for r in metrics["records"][:3]
            ],
        }
    if base is not None:
        prompts = [
            encode_prompt(tokenizer, [{"role": "user", "content": r["prompt"]}])
            for r in data["retention"][: config.n_kl]
        ]
        result["kl_drift"] = kl_drift(
            base, model, tokenizer, prompts, max_new_tokens=config.kl_max_new_tokens, batch_size=config.gen_batch_size
        )
    return result


def train(base_path: str, data_file: Path, loss: str, output_dir: Path, config: StudyConfig) -> dict:
    from onsft.losses import LossConfig
    from onsft.train import TrainInputs, run_training
    from onsft.trainer import TrainConfig

    inputs = TrainInputs(
        model=base_path, data=str(data_file), overlong="truncate", lora_r=config.lora_r, lora_alpha=config.lora_alpha
    )
    args = TrainConfig(
        output_dir=str(output_dir),
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, config.max_steps // 10),
        logging_steps=max(1, config.max_steps // 8),
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        max_length=config.max_length,
        seed=config.seed,
    )
    summary = run_training(inputs, LossConfig(loss=loss), args)
    return {k: summary[k] for k in ("global_step", "train_loss", "rows", "response_tokens_per_epoch")}


# --------------------------------------------------------------------------------------------- run


def _phi_summary(scores: list[dict]) -> dict:
    from statistics import NormalDist

    if not scores:
        return {"n": 0}
    z = sorted(s["z"] for s in scores)
    normal = NormalDist()
    ks = max(max(abs((i + 1) / len(z) - normal.cdf(v)), abs(i / len(z) - normal.cdf(v))) for i, v in enumerate(z))
    tokens = sum(s["n_tokens"] for s in scores)
    return {
        "n": len(scores),
        "mean_phi": statistics.fmean(s["mean_phi"] for s in scores),
        "mean_phi_token_weighted": sum(s["sum_phi"] for s in scores) / tokens,
        "z_mean": statistics.fmean(z),
        "z_std": statistics.pstdev(z) if len(z) > 1 else float("nan"),
        "z_ks_distance": ks,
        "fraction_rejected_at_0.05": sum(s["p_value"] < 0.05 for s in scores) / len(scores),
        "mean_tokens": tokens / len(scores),
    }


def run_study(config: StudyConfig) -> dict:
    config.validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    started = time.time()
    work, out = Path(config.work), Path(config.out)
    cache, timings = Cache(work / "cache" / _fingerprint(config, *DATA_FIELDS)), {}
    data = cache.get("data", lambda: make_data(config), timings)
    for name, rows in data.items():
        write_jsonl_atomic(work / "data" / f"{name}.jsonl", rows)
    from onsft.models import load_model, load_tokenizer

    base_path = cache.get("materialize", lambda: materialize(config.model, work / "base"), timings)
    tokenizer, base = load_tokenizer(base_path), load_model(base_path)
    train_rows = data["train"]
    sampling = _fingerprint(config, "max_new_tokens", "simple_max_new_tokens", "gen_batch_size", "max_length")
    own = cache.get(f"own_samples-{sampling}", lambda: own_samples(base, tokenizer, train_rows, config), timings)
    references = cache.get(
        "reference_scores",
        lambda: score_texts(base, tokenizer, train_rows, [r["reference"] for r in train_rows], config.max_length),
        timings,
    )
    hd = _fingerprint(
        config, "beta", "rewrite_temperature", "max_new_tokens", "simple_max_new_tokens", "gen_batch_size", "max_length"
    )
    records = cache.get(f"rewrite-{hd}", lambda: rewrite(base, tokenizer, train_rows, config), timings)
    data_files = {"reference": work / "data" / "train.jsonl"}
    if records is not None:
        rewrite_rows = rewrite_training_rows(train_rows, own, records)
        data_files["rewrite"] = work / "data" / f"train_rewrite-{hd}.jsonl"
        write_jsonl_atomic(data_files["rewrite"], rewrite_rows)
    else:
        print(
            "onsft study: onsft.rewrite is not available; the rewrite step and the runs trained on rewrites are "
            "skipped.",
            file=sys.stderr,
        )
    evaluation = {"base": cache.get(f"eval-base-{sampling}", lambda: evaluate(base, tokenizer, data, config), timings)}
    runs = {}
    training = _fingerprint(config, "lora_r", "lora_alpha", "max_steps", "batch_size", "learning_rate", "max_length")
    for method in config.methods:
        loss, _, kind = method.partition(":")
        if kind not in data_files:
            runs[method] = {"skipped": "no rewrites (onsft.rewrite not available)"}
            continue
        folder = work / "runs" / f"{loss}-{kind}-{training}-{hd if kind == 'rewrite' else 'ref'}"
        runs[method] = cache.get(
            f"train-{folder.name}",
            lambda kind=kind, loss=loss, folder=folder: train(base_path, data_files[kind], loss, folder, config),
            timings,
        )

        def tuned_eval(folder=folder):
            tuned = load_model(folder / "model")
            try:
                return evaluate(tuned, tokenizer, data, config, base=base)
            finally:
                del tuned

        evaluation[method] = cache.get(f"eval-{folder.name}-{sampling}", tuned_eval, timings)

    audit = {}
    for task in (config.task, config.simple_task):
        positions = [i for i, r in enumerate(train_rows) if r["task"] == task]
        audit[task] = {
            "references": _phi_summary([references[i] for i in positions]),
            "own_samples": _phi_summary([own[i] for i in positions]),
            "own_sample_accuracy": sum(own[i]["correct"] for i in positions) / len(positions),
        }
        if records is not None:
            verified = [records[i]["score"] for i in positions if records[i]["verified"] and "score" in records[i]]
            audit[task]["rewrites_verified"] = _phi_summary(verified)
            audit[task]["rewrite_success_rate"] = len(verified) / len(positions)
            audit[task]["mean_lambda"] = statistics.fmean(
                records[i]["mean_lambda"] for i in positions if records[i]["mean_lambda"] is not None
            )
    counts = {}
    if records is not None:
        rows = [json.loads(x) for x in data_files["rewrite"].read_text(encoding="utf-8").splitlines()]
        counts = {
            task: {p: sum(r["task"] == task and r["provenance"] == p for r in rows) for p in ("own", "hinted")}
            for task in (config.task, config.simple_task)
        }
    results = {
        "config": dataclasses.asdict(config),
        "audit": audit,
        "rewrite_training_rows": counts,
        "training": runs,
        "evaluation": evaluation,
        "timings_seconds": timings,
        "wall_seconds_this_run": time.time() - started,
        "torch_threads": torch.get_num_threads(),
    }
    out.mkdir(parents=True, exist_ok=True)
    plot(results, references, own, records, train_rows, config, out)
    write_json_atomic(out / "results.json", results)
    (out / "results.md").write_text(tables(results), encoding="utf-8")
    return results


# ------------------------------------------------------------------------------------ plots, tables


def plot(results: dict, references, own, records, rows, config: StudyConfig, out: Path) -> None:
    from onsft import report

    tasks = (config.task, config.simple_task)
    own_z = {f"own samples: {t}": [own[i]["z"] for i, r in enumerate(rows) if r["task"] == t] for t in tasks}
    report.save_png(report.figure_png(report.z_calibration(own_z)), out / "z_calibration.png")
    sets = {}
    for t in tasks:
        sets[f"references: {t}"] = [references[i]["mean_phi"] for i, r in enumerate(rows) if r["task"] == t]
        if records is not None:
            sets[f"rewrites: {t}"] = [
                records[i]["score"]["mean_phi"]
                for i, r in enumerate(rows)
                if r["task"] == t and records[i]["verified"] and "score" in records[i]
            ]
        sets[f"own samples: {t}"] = [own[i]["mean_phi"] for i, r in enumerate(rows) if r["task"] == t]
    report.save_png(report.figure_png(report.phi_histogram(sets, threshold=-0.1)), out / "mean_phi.png")

    evaluation = results["evaluation"]
    names = list(evaluation)
    fig, (ax, kl_ax) = report.new_figure(ncols=2, width=5.5)
    keys = (
        ("test_task", config.task),
        ("test_simple", config.simple_task),
        ("retention", f"{config.retention_task} (held out)"),
    )
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        values = [evaluation[name][k]["accuracy"] for k, _ in keys]
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(keys))]
        ax.bar(xs, values, width, label=name, color=report.PALETTE[j % len(report.PALETTE)])
        for x, v in zip(xs, values):
            ax.text(x, v + 0.01, f"{v:.2f}", ha="center", fontsize=7)
    ax.set_xticks(range(len(keys)), [label for _, label in keys])
    ax.set(ylabel="greedy accuracy (math-verify)", ylim=(0, 1), title="Accuracy after training")
    ax.legend(fontsize=7)
    tuned = [n for n in names if "kl_drift" in evaluation[n]]
    kl_ax.bar(
        range(len(tuned)),
        [evaluation[n]["kl_drift"] for n in tuned],
        color=[report.PALETTE[names.index(n) % len(report.PALETTE)] for n in tuned],
    )
    kl_ax.set_xticks(range(len(tuned)), tuned)
    kl_ax.set(ylabel="KL(base || tuned), nats/token", title=f"Drift on {config.retention_task} prompts")
    report.save_png(report.figure_png(fig), out / "accuracy.png")


def _f(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def tables(results: dict) -> str:
    config = results["config"]
    lines = [
        "| set | n | mean phi (per response) | mean phi (per token) | Z mean | Z std | rejected at 0.05 |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, audit in results["audit"].items():
        for key, label in (
            ("references", "references"),
            ("rewrites_verified", "rewrites (verified)"),
            ("own_samples", "own samples (tau=1)"),
        ):
            s = audit.get(key)
            if s and s.get("n"):
                lines.append(
                    f"| {task}: {label} | {s['n']} | {_f(s['mean_phi'])} | {_f(s['mean_phi_token_weighted'])} "
                    f"| {_f(s['z_mean'], 2)} | {_f(s['z_std'], 2)} | {_f(s['fraction_rejected_at_0.05'], 2)} |"
                )
    lines += [
        "",
        f"| model | {config['task']} | {config['simple_task']} | {config['retention_task']} (held out) "
        f"| KL drift | train loss |",
        "|---|---|---|---|---|---|",
    ]
    for name, ev in results["evaluation"].items():
        run = results["training"].get(name, {})
        lines.append(
            f"| {name} | {_f(ev['test_task']['accuracy'])} | {_f(ev['test_simple']['accuracy'])} "
            f"| {_f(ev['retention']['accuracy'])} | {_f(ev.get('kl_drift'), 4)} | {_f(run.get('train_loss'))} |"
        )
    timing = results["timings_seconds"]
    lines += ["", "| step | seconds |", "|---|---|"] + [f"| {k} | {v:.0f} |" for k, v in timing.items()]
    lines.append(f"| total (sum of steps) | {sum(timing.values()):.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    (config,) = parse_command(argv, StudyConfig, prog="python -m onsft.study")
    results = run_study(config)
    print(tables(results))
    return 0


if __name__ == "__main__":
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        sys.exit(main(sys.argv[1:]))
    except UserError as error:
        print(str(error), file=sys.stderr)
        sys.exit(2)
