"""`onsft eval`: accuracy (greedy pass@1, sampled pass@k), retention and KL drift of a model.

    onsft eval --model runs/idft/model --data test.jsonl --out runs/idft/eval --samples 8 \\
        --retention_data old_skills.jsonl --base_model organism

What is measured
- accuracy: greedy decoding (temperature 0), one response per prompt, checked by the verifier
  (`onsft.verify`: math, exact, or your own function) against the `answer` column: pass@1.
- pass@k: `--samples n` responses per prompt at `--temperature`; for each k <= n the unbiased
  estimator 1 - C(n-c, k) / C(n, k) (c = correct samples), averaged over prompts. `sampled_accuracy`
  is the mean fraction of correct samples (= pass@1 from samples).
- per task: every number above again per value of a `task` column, when the data has one.
- retention (forgetting, part 1): greedy accuracy on `--retention_data`, a set of skills the model had.
- KL drift (forgetting, part 2), with `--base_model`: the base model writes continuations of the
  prompts of `--kl_data` (default: the retention data, else the eval data) -- greedy by default,
  or sampled with `--kl_continuation sampled` -- and both models score them. At every continuation
  position t (prompt tokens excluded, the final EOS included) the exact KL over the vocabulary
      KL_t = sum_v p_base(v | ctx_t) (log p_base(v | ctx_t) - log p_tuned(v | ctx_t))
  is computed; the reported number is the mean of KL_t over all continuation tokens of all prompts
  (token-weighted). It measures how far tuning moved the model on text the base model itself writes.

Outputs in `--out`: metrics.json, generations.jsonl (each input row with its fields kept, plus the
greedy response, samples, extracted answers and correct flags; these added fields -- generation,
finish_reason, n_tokens, extracted_answer, correct, verify_method, samples, n_correct -- replace input
columns of the same name), retention.jsonl and kl.jsonl when
asked, and accuracy.png. A killed run rerun with the same command resumes: finished prompts are read
back from the `.partial` files (keyed by example index), nothing is generated twice, and the final
files appear only when everything is done.

Sampling seeds: prompts are decoded in fixed chunks; the samples of a chunk come from
`--seed` and the chunk's first example index, so results are reproducible for given
`--seed --samples --batch_size`, and identical between an interrupted and an uninterrupted run.
"""

from __future__ import annotations

import math
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from onsft.config import parse_command
from onsft.data import Example, encode_prompt, load_examples
from onsft.errors import UserError
from onsft.records import ResumableJsonl, check_writable, write_json_atomic

KL_CONTINUATIONS = ("greedy", "sampled")


@dataclass
class EvalConfig:
    model: str = field(
        default="organism", metadata={"help": "Model to evaluate: Hugging Face name, local path or `organism`."}
    )
    data: str = field(
        default="", metadata={"help": "Evaluation data with an `answer` column (.jsonl/.parquet/.csv/...)."}
    )
    out: str = field(default="runs/eval", metadata={"help": "Output folder (metrics.json, generations.jsonl, plot)."})
    verifier: str = field(default="math", metadata={"help": "math | exact | module:function | path/file.py:function."})
    verify_timeout: int = field(default=5, metadata={"help": "Seconds math-verify may spend per parse / comparison."})
    max_new_tokens: int = field(default=512, metadata={"help": "Most tokens generated per response."})
    batch_size: int = field(default=16, metadata={"help": "Sequences decoded together."})
    greedy: bool = field(default=True, metadata={"help": "Decode one greedy response per prompt (pass@1)."})
    samples: int = field(default=0, metadata={"help": "Sampled responses per prompt for pass@k (0 = none)."})
    pass_k: list[int] = field(
        default_factory=list,
        metadata={"help": "k values for pass@k (each <= --samples); default: 1, 2, 4, ... up to --samples."},
    )
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of the pass@k samples."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling of the pass@k samples (1 = off)."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling of the pass@k samples (0 = off)."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})
    limit: int = field(default=0, metadata={"help": "Evaluate only the first N rows of each dataset (0 = all)."})
    retention_data: str | None = field(
        default=None,
        metadata={"help": "Data of skills to keep (with `answer`): greedy accuracy there measures forgetting."},
    )
    base_model: str | None = field(
        default=None,
        metadata={"help": "Model before tuning: reports KL(base || model) on the base model's own continuations."},
    )
    kl_data: str | None = field(
        default=None, metadata={"help": "Prompts for the KL drift (default: --retention_data, else --data)."}
    )
    kl_continuation: str = field(
        default="greedy",
        metadata={"help": "Base-model continuations scored for KL: greedy or sampled (at --kl_temperature)."},
    )
    kl_temperature: float = field(default=1.0, metadata={"help": "Temperature of sampled KL continuations."})
    kl_max_new_tokens: int = field(default=128, metadata={"help": "Length of the base model's KL continuations."})
    plot: bool = field(default=True, metadata={"help": "Write accuracy.png (bars per task, pass@k curve)."})

    def validate(self) -> None:
        from onsft.generation import SamplingConfig

        def bad(name: str, why: str):
            raise UserError(f"`{name}` {why}", where="command line", fix=f"pass a valid --{name}.")

        if self.samples < 0:
            bad("samples", "must be >= 0")
        if not self.greedy and self.samples == 0:
            bad("samples", "must be > 0 when --greedy false (nothing would be evaluated)")
        if any(k < 1 or k > self.samples for k in self.pass_k):
            bad("pass_k", f"values must be between 1 and --samples ({self.samples})")
        if self.kl_continuation not in KL_CONTINUATIONS:
            bad("kl_continuation", f"must be one of {', '.join(KL_CONTINUATIONS)}")
        if self.limit < 0:
            bad("limit", "must be >= 0")
        if self.verify_timeout < 1:
            bad("verify_timeout", "must be at least 1 second")
        self.sampling(greedy=True).validate()
        if self.samples:
            self.sampling(greedy=False).validate()
        SamplingConfig(max_new_tokens=self.kl_max_new_tokens, temperature=self.kl_temperature).validate()

    def ks(self) -> list[int]:
        if self.pass_k:
            return sorted(set(self.pass_k))
        return [2**i for i in range(int(math.log2(self.samples)) + 1)] if self.samples else []

    def sampling(self, greedy: bool, seed: int | None = None):
        from onsft.generation import SamplingConfig

        return SamplingConfig(
            max_new_tokens=self.max_new_tokens,
            temperature=0.0 if greedy else self.temperature,
            top_p=1.0 if greedy else self.top_p,
            top_k=0 if greedy else self.top_k,
            seed=self.seed if seed is None else seed,
            batch_size=self.batch_size,
        )


# ------------------------------------------------------------------------------------ pure metrics


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k), as a stable product."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def _summary(rows: Sequence[dict], ks: Sequence[int]) -> dict:
    out: dict = {"n": len(rows)}
    greedy = [r["correct"] for r in rows if "correct" in r]
    if greedy:
        out["accuracy"] = sum(map(bool, greedy)) / len(greedy)
    sampled = [[s["correct"] for s in r["samples"]] for r in rows if r.get("samples")]
    if sampled:
        out["sampled_accuracy"] = sum(sum(c) / len(c) for c in sampled) / len(sampled)
        out["pass_at_k"] = {
            str(k): sum(pass_at_k(len(c), sum(c), k) for c in sampled) / len(sampled)
            for k in ks
            if all(len(c) >= k for c in sampled)
        }
    return out


def aggregate(rows: Sequence[dict], ks: Sequence[int] = ()) -> dict:
    """Accuracy, pass@k and their breakdown by `task` (when rows carry one) from evaluated rows."""
    result = _summary(rows, ks)
    by_task: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if row.get("task") is not None:
            by_task[str(row["task"])].append(row)
    if by_task:
        result["by_task"] = {task: _summary(group, ks) for task, group in sorted(by_task.items())}
    finish = Counter(r["finish_reason"] for r in rows if "finish_reason" in r)
    finish.update(s["finish_reason"] for r in rows for s in r.get("samples", ()))
    methods = Counter(r["verify_method"] for r in rows if "verify_method" in r)
    methods.update(s["verify_method"] for r in rows for s in r.get("samples", ()))
    result["finish_reasons"] = dict(sorted(finish.items()))
    result["verify_methods"] = dict(sorted(methods.items()))
    return result


def kl_per_position(base_logits: torch.Tensor, tuned_logits: torch.Tensor) -> torch.Tensor:
    """KL(base || tuned) at every position over the last (vocabulary) dimension, in float32 or better."""
    dtype = torch.promote_types(base_logits.dtype, torch.float32)
    base = torch.log_softmax(base_logits.to(dtype), dim=-1)
    tuned = torch.log_softmax(tuned_logits.to(dtype), dim=-1)
    return (base.exp() * (base - tuned)).sum(-1)


# ------------------------------------------------------------------------------------------ evaluation


def _evaluate_rows(
    model,
    tokenizer,
    examples: Sequence[Example],
    config: EvalConfig,
    verifier,
    store: ResumableJsonl | None = None,
    greedy: bool | None = None,
    samples: int | None = None,
    desc: str = "eval",
    where: str = "data",
) -> list[dict]:
    """Generate, verify and build one row per example (input fields kept). With a store, examples it
    already holds are skipped and new rows are appended after every chunk."""
    from tqdm.auto import tqdm

    from onsft.generation import generate

    greedy = config.greedy if greedy is None else greedy
    samples = config.samples if samples is None else samples
    done = store.done if store is not None else {}
    # One chunk = one greedy batch of prompts; its samples (chunk x samples rows) run in full batches too.
    chunk = config.batch_size
    rows: dict[int, dict] = {i: done[e.index] for i, e in enumerate(examples) if e.index in done}
    context = getattr(model.config, "max_position_embeddings", None)
    with tqdm(total=len(examples), initial=len(rows), desc=desc, unit="prompt", dynamic_ncols=True) as bar:
        for start in range(0, len(examples), chunk):
            # A chunk is decoded whole even when a kill left part of it on disk: the samples of an
            # example depend on its chunk, and the rows already on disk are kept as they are.
            todo = list(range(start, min(start + chunk, len(examples))))
            fresh = [i for i in todo if i not in rows]
            if not fresh:
                continue
            prompts = [encode_prompt(tokenizer, examples[i].prompt, where) for i in todo]
            for i, prompt in zip(todo, prompts):
                if context and len(prompt) >= context:
                    raise UserError(
                        f"prompt has {len(prompt)} tokens; the model's context is {context}",
                        where=where,
                        line=examples[i].line,
                        fix="shorten the prompt, or evaluate with --limit / without it.",
                    )
            new = {i: {**examples[i].record, "_index": examples[i].index} for i in todo}
            if greedy:
                for i, generation in zip(todo, generate(model, tokenizer, prompts, config.sampling(greedy=True))):
                    verdict = verifier.check(generation.text, examples[i].answer)
                    new[i].update(
                        generation=generation.text,
                        finish_reason=generation.finish_reason,
                        n_tokens=generation.n_tokens,
                        extracted_answer=verdict.extracted,
                        correct=verdict.correct,
                        verify_method=verdict.method,
                    )
            if samples:
                # The chunk's seed depends on its first example only, so a resumed run samples the same.
                sampling = config.sampling(greedy=False, seed=config.seed * 1_000_003 + examples[start].index)
                repeated = [p for p in prompts for _ in range(samples)]
                outputs = generate(model, tokenizer, repeated, sampling)
                for slot, i in enumerate(todo):
                    new[i]["samples"] = []
                    for generation in outputs[slot * samples : (slot + 1) * samples]:
                        verdict = verifier.check(generation.text, examples[i].answer)
                        new[i]["samples"].append(
                            {
                                "text": generation.text,
                                "finish_reason": generation.finish_reason,
                                "n_tokens": generation.n_tokens,
                                "extracted_answer": verdict.extracted,
                                "correct": verdict.correct,
                                "verify_method": verdict.method,
                            }
                        )
                    new[i]["n_correct"] = sum(s["correct"] for s in new[i]["samples"])
            if store is not None:
                store.append_many([new[i] for i in fresh])
            rows.update({i: new[i] for i in fresh})
            bar.update(len(fresh))
    return [rows[i] for i in range(len(examples))]


def _check_answers(examples: Sequence[Example], where: str) -> None:
    missing = [e for e in examples if e.answer is None or not str(e.answer).strip()]
    if missing:
        raise UserError(
            f"{len(missing)} row(s) have no `answer`, which accuracy needs",
            where=where,
            line=missing[0].line,
            fix="add an `answer` column (the gold final answer) to every row.",
        )


def evaluate_model(
    model,
    tokenizer,
    examples: Sequence[Example],
    config: EvalConfig | None = None,
    *,
    verifier=None,
    return_records: bool = False,
) -> dict:
    """In-process evaluation (used by `onsft compare` and the demo): the metrics of `aggregate`, plus
    the evaluated rows under "records" when `return_records`. Writes nothing."""
    from onsft.verify import get_verifier

    config = config or EvalConfig()
    config.validate()
    _check_answers(examples, "examples")
    verifier = get_verifier(verifier or config.verifier, timeout_seconds=config.verify_timeout)
    rows = _evaluate_rows(model, tokenizer, examples, config, verifier, where="examples")
    result = aggregate(rows, config.ks())
    if return_records:
        result["records"] = rows
    return result


# ------------------------------------------------------------------------------------------- KL drift


def _kl_sums(
    base_model,
    model,
    sequences: list[list[int]],
    prompt_lengths: list[int],
    pad_id: int,
    batch_size: int,
    max_logits: int,
) -> list[tuple[float, int]]:
    """(sum of KL_t, token count) per sequence, over the positions that predict its continuation."""
    vocab = model.get_output_embeddings().weight.shape[0]
    lengths = [len(s) - p for s, p in zip(sequences, prompt_lengths)]
    order = sorted(range(len(sequences)), key=lambda i: -lengths[i])
    out: dict[int, tuple[float, int]] = {}
    start = 0
    while start < len(order):
        # Left padding puts every continuation in the last columns, so only the last `keep` columns
        # need logits; the longest continuation comes first and sets `keep` for its batch.
        keep = lengths[order[start]] + 1
        rows = max(1, min(batch_size, max_logits // (keep * vocab)))
        batch = order[start : start + rows]
        width = max(len(sequences[i]) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, i in enumerate(batch):
            ids[r, width - len(sequences[i]) :] = torch.tensor(sequences[i])
            mask[r, width - len(sequences[i]) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        logits = []
        for net in (base_model, model):
            output = net(
                input_ids=ids.to(net.device),
                attention_mask=mask.to(net.device),
                position_ids=positions.to(net.device),
                use_cache=False,
                logits_to_keep=keep,
            )
            logits.append(output.logits.to(model.device))
        if logits[0].shape[-1] != logits[1].shape[-1]:
            raise UserError(
                f"the base model has {logits[0].shape[-1]} output tokens, the model "
                f"{logits[1].shape[-1]}; KL needs one vocabulary",
                where="--base_model",
                fix="compare a model with the base it was tuned from (same tokenizer).",
            )
        # Kept column j predicts the token in column (width - keep + j + 1): a row's n continuation
        # tokens (its last n columns) are predicted by kept columns keep-1-n .. keep-2.
        kl = kl_per_position(logits[0][:, :-1], logits[1][:, :-1])
        for r, i in enumerate(batch):
            out[i] = (float(kl[r, keep - 1 - lengths[i] :].double().sum()), lengths[i])
        start += len(batch)
    return [out[i] for i in range(len(sequences))]


@torch.inference_mode()
def kl_drift(
    base_model,
    model,
    tokenizer,
    prompts_ids: list[list[int]],
    *,
    continuation: str = "greedy",
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    max_logits: int = 2**27,
    return_per_prompt: bool = False,
):
    """Mean over continuation tokens of KL(base || model), on the base model's own continuations of
    `prompts_ids` (greedy or sampled). With `return_per_prompt`, also [(kl_sum, tokens)] per prompt.
    `max_logits` bounds the logits held at once per model (rows x kept positions x vocabulary)."""
    from onsft.generation import SamplingConfig, generate

    if continuation not in KL_CONTINUATIONS:
        raise UserError(f"unknown continuation `{continuation}`", where="kl_drift", fix="use greedy or sampled.")
    sampling = SamplingConfig(
        max_new_tokens=max_new_tokens,
        temperature=0.0 if continuation == "greedy" else temperature,
        seed=seed,
        batch_size=batch_size,
    )
    continuations = generate(base_model, tokenizer, prompts_ids, sampling)
    sequences = [list(p) + list(g.token_ids) for p, g in zip(prompts_ids, continuations)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = (base_model.training, model.training)
    base_model.eval()
    model.eval()
    try:
        per_prompt = _kl_sums(
            base_model, model, sequences, [len(p) for p in prompts_ids], pad_id, batch_size, max_logits
        )
    finally:
        base_model.train(was_training[0])
        model.train(was_training[1])
    total = sum(s for s, _ in per_prompt)
    tokens = sum(n for _, n in per_prompt)
    mean = total / tokens if tokens else 0.0
    return (mean, per_prompt) if return_per_prompt else mean


# -------------------------------------------------------------------------------------------- command


def _load(path: str, limit: int, need_answer: bool) -> list[Example]:
    examples = load_examples(path, require_response=False)
    if limit:
        examples = examples[:limit]
    if need_answer:
        _check_answers(examples, path)
    return examples


def _plot(metrics: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars: list[tuple[str, float, str]] = []
    key = "accuracy" if "accuracy" in metrics else "sampled_accuracy"
    bars.append(("all", metrics[key], "tab:blue"))
    bars += [(task, m.get(key, 0.0), "tab:blue") for task, m in metrics.get("by_task", {}).items()]
    retention = metrics.get("retention")
    if retention:
        bars.append(("retention", retention["accuracy"], "tab:orange"))
        bars += [(f"ret:{t}", m["accuracy"], "tab:orange") for t, m in retention.get("by_task", {}).items()]
    curves = metrics.get("pass_at_k")
    figure, axes = plt.subplots(1, 2 if curves else 1, figsize=(11 if curves else 6, 4), squeeze=False)
    ax = axes[0][0]
    ax.bar(range(len(bars)), [b[1] for b in bars], color=[b[2] for b in bars])
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], rotation=45, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("greedy accuracy" if key == "accuracy" else "sampled accuracy")
    title = Path(str(metrics.get("model", ""))).name
    if metrics.get("kl"):
        title += f"  (KL drift {metrics['kl']['mean_kl_per_token']:.4f} nats/token)"
    ax.set_title(title)
    for x, (_, value, _) in enumerate(bars):
        ax.text(x, value + 0.01, f"{value:.2f}", ha="center", fontsize=8)
    if curves:
        ax = axes[0][1]
        series = [("all", curves)] + [
            (t, m["pass_at_k"]) for t, m in metrics.get("by_task", {}).items() if m.get("pass_at_k")
        ]
        for name, curve in series:
            ks = sorted(curve, key=int)
            ax.plot([int(k) for k in ks], [curve[k] for k in ks], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k")
        ax.set_ylabel("pass@k (unbiased)")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
    figure.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp, dpi=120)
    plt.close(figure)
    tmp.replace(path)


def run_eval(config: EvalConfig) -> dict:
    from onsft.models import load_model, load_tokenizer
    from onsft.verify import get_verifier

    config.validate()
    if not config.data:
        raise UserError("no evaluation data given", where="command line", fix="pass --data FILE.")
    out = Path(config.out)
    check_writable(out / "metrics.json")
    verifier = get_verifier(config.verifier, timeout_seconds=config.verify_timeout)
    examples = _load(config.data, config.limit, need_answer=True)
    retention = _load(config.retention_data, config.limit, need_answer=True) if config.retention_data else None
    kl_source = config.kl_data or config.retention_data or config.data
    kl_examples = _load(kl_source, config.limit, need_answer=False) if config.base_model else None
    settings = {k: v for k, v in asdict(config).items() if k not in ("out", "plot")}
    finished = _finished(out / "metrics.json", settings)
    if finished is not None:
        print(f"onsft: {out} already holds this finished evaluation; nothing to do.", file=sys.stderr)
        return finished
    tokenizer = load_tokenizer(config.model)
    # A tokenizer without a chat template fails here, before the model loads and any output file exists.
    encode_prompt(tokenizer, examples[0].prompt, config.data)
    model = load_model(config.model)
    started = time.time()
    stores = [ResumableJsonl(out / "generations.jsonl", fingerprint={"part": "eval", **settings})]
    rows = _evaluate_rows(model, tokenizer, examples, config, verifier, stores[0], where=config.data)
    metrics: dict = {
        "model": config.model,
        "data": config.data,
        "verifier": config.verifier,
        **aggregate(rows, config.ks()),
    }
    if retention is not None:
        stores.append(ResumableJsonl(out / "retention.jsonl", fingerprint={"part": "retention", **settings}))
        retention_rows = _evaluate_rows(
            model,
            tokenizer,
            retention,
            config,
            verifier,
            stores[-1],
            greedy=True,
            samples=0,
            desc="retention",
            where=config.retention_data,
        )
        metrics["retention"] = {"data": config.retention_data, **aggregate(retention_rows)}
    if kl_examples is not None:
        stores.append(ResumableJsonl(out / "kl.jsonl", fingerprint={"part": "kl", **settings}))
        metrics["kl"] = _kl_command(config, model, tokenizer, kl_examples, stores[-1], kl_source)
    metrics["wall_seconds_this_run"] = time.time() - started
    metrics["config"] = asdict(config)
    metrics["settings"] = settings
    # Every part is complete: publish the final files, then the metrics that summarise them.
    for store in stores:
        store.finalize(order=range(max(len(examples), len(retention or []), len(kl_examples or []))))
    if config.plot:
        _plot(metrics, out / "accuracy.png")
    write_json_atomic(out / "metrics.json", metrics)
    return metrics


def _finished(path: Path, settings: dict) -> dict | None:
    """The saved result of a completed run with the same settings (a rerun must not redo it)."""
    import json

    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    same = json.loads(json.dumps(settings, default=str)) == saved.get("settings")
    return saved if same else None


def _kl_command(
    config: EvalConfig, model, tokenizer, examples: list[Example], store: ResumableJsonl, where: str
) -> dict:
    from tqdm.auto import tqdm

    from onsft.models import load_model

    base = load_model(config.base_model)
    chunk = config.batch_size
    bar = tqdm(total=len(examples), initial=len(store.done), desc="kl drift", unit="prompt", dynamic_ncols=True)
    for start in range(0, len(examples), chunk):
        todo = [e for e in examples[start : start + chunk] if e.index not in store.done]
        if not todo:
            continue
        prompts = [encode_prompt(tokenizer, e.prompt, where) for e in todo]
        _, per_prompt = kl_drift(
            base,
            model,
            tokenizer,
            prompts,
            continuation=config.kl_continuation,
            max_new_tokens=config.kl_max_new_tokens,
            temperature=config.kl_temperature,
            seed=config.seed * 1_000_003 + examples[start].index,
            batch_size=config.batch_size,
            return_per_prompt=True,
        )
        store.append_many(
            [
                {**e.record, "_index": e.index, "kl_sum": s, "kl_tokens": n, "kl_mean": s / n if n else 0.0}
                for e, (s, n) in zip(todo, per_prompt)
            ]
        )
        bar.update(len(todo))
    bar.close()
    rows = store.rows(e.index for e in examples)
    tokens = sum(r["kl_tokens"] for r in rows)
    return {
        "base_model": config.base_model,
        "data": where,
        "direction": "KL(base || model)",
        "continuation": config.kl_continuation,
        "prompts": len(rows),
        "tokens": tokens,
        "mean_kl_per_token": sum(r["kl_sum"] for r in rows) / tokens if tokens else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    import json

    (config,) = parse_command(argv, EvalConfig, prog="onsft eval")
    metrics = run_eval(config)
    shown = {k: metrics[k] for k in ("accuracy", "sampled_accuracy", "pass_at_k") if k in metrics}
    if "retention" in metrics:
        shown["retention_accuracy"] = metrics["retention"].get("accuracy")
    if "kl" in metrics:
        shown["kl_drift"] = metrics["kl"]["mean_kl_per_token"]
    print(json.dumps(shown))
    return 0
