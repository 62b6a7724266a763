"""Evaluating a model on rows with gold answers: generate, verify, aggregate (accuracy, pass@k, by task).

`evaluate_rows` decodes a greedy response and/or sampled ones per prompt in fixed chunks (a chunk's
samples are seeded by its first example, so a resumed run samples the same) and verifies each against
the row's `answer`; `aggregate` turns rows into accuracy, unbiased pass@k and a per-task breakdown.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

from onsft.data.chat import char_budget, check_known_text, check_text_budget, encode_prompt, text_chars
from onsft.data.rows import Example
from onsft.data.verify import Verifier, VerifyConfig
from onsft.engine.decoding import SamplingConfig, generate
from onsft.errors import UserError
from onsft.formulas.stats import pass_at_k
from onsft.pipeline.report import figure_png, new_figure, save_png
from onsft.runtime.device import stream_seed
from onsft.runtime.models import context_length
from onsft.runtime.progress import note_resume, progress
from onsft.runtime.records import ResumableJsonl


def default_ks(samples: int) -> list[int]:
    """k = 1, 2, 4, ... up to the number of samples."""
    return [2**i for i in range(int(math.log2(samples)) + 1)] if samples else []


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


def check_answers(examples: Sequence[Example], where: str) -> None:
    missing = [e for e in examples if e.answer is None or not str(e.answer).strip()]
    if missing:
        raise UserError(
            f"{len(missing)} row(s) have no `answer`, which accuracy needs",
            where=where,
            line=missing[0].line,
            fix="add an `answer` column (the gold final answer) to every row.",
        )


def encoded_prompts(tokenizer, examples: Sequence[Example], context: int | None, where: str) -> list[list[int] | None]:
    """Each prompt's token ids (a chat template that rejects it raises), or None for a prompt far past `context`
    by its characters alone, which is never tokenised."""
    budget = char_budget(tokenizer, context) if context else None
    return [
        None
        if budget is not None and text_chars(e.prompt) > budget
        else encode_prompt(tokenizer, e.prompt, where, e.line)
        for e in examples
    ]


def fills_context(prompt: list[int] | None, context: int | None) -> bool:
    """No room left to generate: the prompt (None: far past the context, see `encoded_prompts`) fills it."""
    return prompt is None or bool(context) and len(prompt) >= context


def check_prompts(
    tokenizer, examples: Sequence[Example], context: int | None, where: str, fix: str = "shorten or remove the row."
) -> list[list[int]]:
    """Every prompt's token ids, refusing (before anything is generated) a prompt that fills the context, a
    prompt far past it by its characters alone (never tokenised), and one the chat template rejects."""
    check_text_budget(tokenizer, examples, context, where)  # names the characters of the first such row
    prompts = encoded_prompts(tokenizer, examples, context, where)
    over = [i for i, p in enumerate(prompts) if fills_context(p, context)]
    if over:
        raise UserError(
            f"prompt has {len(prompts[over[0]])} tokens; the model's context is {context}"
            + (f" ({len(over)} such rows)" if len(over) > 1 else ""),
            where=where,
            line=examples[over[0]].line,
            fix=fix,
        )
    return prompts


def fitting_prompts(tokenizer, examples: Sequence[Example], context: int | None, where: str):
    """(the examples whose prompt leaves room to generate within `context`, the file lines of the others): the
    rows `--overlong drop` evaluates, by the rule `check_prompts` refuses with (no known context: every row)."""
    if not context:
        return list(examples), []
    fills = [fills_context(p, context) for p in encoded_prompts(tokenizer, examples, context, where)]
    return [e for e, full in zip(examples, fills) if not full], [e.line for e, full in zip(examples, fills) if full]


def check_prompt_set(
    tokenizer, examples: Sequence[Example], context: int | None, where: str, fix: str = "shorten or remove the row."
) -> list[list[int]]:
    """`check_prompts` for a whole input set before a run, plus the count of prompts the tokenizer maps to
    nothing but unknown tokens (an error when every prompt is like that)."""
    prompts = check_prompts(tokenizer, examples, context, where, fix)
    texts = ["\n".join(m["content"] for m in e.prompt) for e in examples]
    check_known_text(tokenizer, texts, [e.line for e in examples], where, "prompt")
    return prompts


def _verified(generation, verdict) -> dict:
    return {
        "finish_reason": generation.finish_reason,
        "n_tokens": generation.n_tokens,
        "extracted_answer": verdict.extracted,
        "correct": verdict.correct,
        "verify_method": verdict.method,
    }


def evaluate_rows(
    model,
    tokenizer,
    examples: Sequence[Example],
    sampling: SamplingConfig,
    verifier: Verifier,
    *,
    greedy: bool = True,
    samples: int = 0,
    store: ResumableJsonl | None = None,
    desc: str = "eval",
    where: str = "data",
    show_progress: bool = True,
    command: str = "eval",
) -> list[dict]:
    """Generate, verify and build one row per example (input fields kept): a greedy response (`generation`,
    `correct`, ...) and/or `samples` draws at `sampling`'s temperature (`samples`, `n_correct`). Chunks are
    `sampling.batch_size` prompts. With a store, examples it already holds are skipped and new rows are
    appended after every chunk."""
    greedy_sampling = dataclasses.replace(sampling, temperature=0.0, top_p=1.0, top_k=0)
    done = store.done if store is not None else {}
    chunk = sampling.batch_size
    rows: dict[int, dict] = {i: done[e.index] for i, e in enumerate(examples) if e.index in done}
    context = context_length(model)
    if store is not None:
        note_resume(command, len(rows), len(examples), store.partial)
    with progress(len(examples), desc, show_progress, unit="prompt", initial=len(rows)) as bar:
        for start in range(0, len(examples), chunk):
            # A chunk is decoded whole even when a kill left part of it on disk: the samples of an
            # example depend on its chunk, and the rows already on disk are kept as they are.
            todo = list(range(start, min(start + chunk, len(examples))))
            fresh = [i for i in todo if i not in rows]
            if not fresh:
                continue
            prompts = check_prompts(tokenizer, [examples[i] for i in todo], context, where)
            new = {i: {**examples[i].record, "_index": examples[i].index} for i in todo}
            if greedy:
                for i, generation in zip(todo, generate(model, tokenizer, prompts, greedy_sampling)):
                    verdict = verifier.check(generation.text, examples[i].answer)
                    new[i].update(generation=generation.text, **_verified(generation, verdict))
            if samples:
                # The chunk's seed depends on its first example only, so a resumed run samples the same.
                seed = stream_seed("eval", "samples", sampling.seed, examples[start].index)
                repeated = [p for p in prompts for _ in range(samples)]
                outputs = generate(model, tokenizer, repeated, dataclasses.replace(sampling, seed=seed))
                for slot, i in enumerate(todo):
                    new[i]["samples"] = []
                    for generation in outputs[slot * samples : (slot + 1) * samples]:
                        verdict = verifier.check(generation.text, examples[i].answer)
                        new[i]["samples"].append({"text": generation.text, **_verified(generation, verdict)})
                    new[i]["n_correct"] = sum(s["correct"] for s in new[i]["samples"])
            if store is not None:
                store.append_many([new[i] for i in fresh])
            rows.update({i: new[i] for i in fresh})
            bar.update(len(fresh))
    return [rows[i] for i in range(len(examples))]


def evaluate_model(
    model,
    tokenizer,
    examples: Sequence[Example],
    sampling: SamplingConfig | None = None,
    verify: VerifyConfig | Verifier | None = None,
    *,
    greedy: bool = True,
    samples: int = 0,
    pass_k: Sequence[int] = (),
    return_records: bool = False,
    show_progress: bool = False,
) -> dict:
    """In-process evaluation (used by `onsft compare` and the demo): the metrics of `aggregate`, plus
    the evaluated rows under "records" when `return_records`. Writes nothing."""
    sampling = sampling or SamplingConfig()
    sampling.validate()
    verifier = verify if isinstance(verify, Verifier) else (verify or VerifyConfig()).build()
    check_answers(examples, "examples")
    rows = evaluate_rows(
        model,
        tokenizer,
        examples,
        sampling,
        verifier,
        greedy=greedy,
        samples=samples,
        where="examples",
        show_progress=show_progress,
    )
    result = aggregate(rows, sorted(set(pass_k)) or default_ks(samples))
    if return_records:
        result["records"] = rows
    return result


def plot_accuracy(metrics: dict, path: Path) -> None:
    """accuracy.png: bars per task (and retention), and the pass@k curves when there are samples."""
    bars: list[tuple[str, float, str]] = []
    key = "accuracy" if "accuracy" in metrics else "sampled_accuracy"
    bars.append(("all", metrics[key], "tab:blue"))
    bars += [(task, m.get(key, 0.0), "tab:blue") for task, m in metrics.get("by_task", {}).items()]
    retention = metrics.get("retention")
    if retention:
        bars.append(("retention", retention["accuracy"], "tab:orange"))
        bars += [(f"ret:{t}", m["accuracy"], "tab:orange") for t, m in retention.get("by_task", {}).items()]
    curves = metrics.get("pass_at_k")
    figure, axes = new_figure(ncols=2 if curves else 1, width=5.5 if curves else 6, height=4)
    axes = list(axes) if curves else [axes]
    ax = axes[0]
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
        ax = axes[1]
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
    save_png(figure_png(figure), path)
