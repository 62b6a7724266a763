"""Skewed lengths: continuous batching against the static schedule and a uniform workload.

64 examples decoded 16 at a time (`generate`, the loop hinted decoding shares): 56 stop after 16 tokens
and 8 run to 256. The long ones are every 8th example in admission order (`--long-at spread`), so every
static batch of 16 holds two; no schedule can know which examples will be long, and where they arrive
bounds what any first-come schedule reaches (`--long-at first|last` measure the two extremes). Three
variants, each timed in every round, in a rotating order, in one process:

    static      the skewed workload, `schedule="static"`: finished rows leave the batch but their slots
                stay empty until the whole batch has finished (the loop before continuous batching,
                though with its cheaper row retirement)
    continuous  the same workload, `schedule="continuous"` (the default): a freed slot takes the next
                example at once
    uniform     64 examples of 46 tokens each: the same 2944 tokens with no skew (continuous schedule)

Lengths are forced: EOS is suppressed (`min_new_tokens`) and every example has its own token limit
(`token_limits`), so the token counts are exact whatever the model writes. Rates are generated tokens
per second of process CPU time with one torch thread (other jobs on a shared machine do not decide
them); wall-clock rates are reported beside them. Ratios are computed within each round, then the
median and the range over rounds are reported. Static and continuous must give identical tokens
(checked every round).

A decoding step costs nearly the same with 8 rows as with 16 (it is dominated by reading the weights
and by per-call overhead), so tokens per second follow the number of forward passes: the uniform
workload needs 45 steps per wave of 16 examples (180 in all), the skewed one at least 255 steps for a
long example plus the steps before the last long example is admitted. At a constant step cost the
skewed workload can reach at most 180/256 = 0.70x of the uniform one (long examples first) and about
180/320 = 0.56x with them spread; the counts in the output (decode steps, idle slot share) show where
a run stands.

Model: the embedded organism (Llama, 4 layers, hidden 256, ~3M parameters, float32), greedy, on its
own retention-test prompts (chat template applied). `--model NAME` (an alias such as smollm2-135m, a local
folder, anything `onsft.runtime.models.load_model` accepts) runs the same workload on that model, loaded as
onsft loads it (float32 on the CPU), with the same retention-test questions (real text: "Compare 58 and
59.", "Reverse bigwxnc.", ...) in that model's chat template; its default output is
benchmarks/results/skewed-NAME.json.

Where the time goes: every variant makes the same row-steps (one per generated token after the first), so
their times differ by the number of decode steps. `step_cost` fits, per round, time = a x decode steps + c
over the three variants: a is the fixed cost of a step (weights, per-call overhead), c what does not depend
on the schedule (per-row work, prefill); c / row-steps bounds the per-row cost from above. With those,
static / continuous can reach at most (a x static steps + c) / (a x continuous steps + c).

    .venv/bin/python benchmarks/skewed.py [--rounds 5 --out benchmarks/results/skewed.json]
    .venv/bin/python benchmarks/skewed.py --model smollm2-135m [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from onsft.data.chat import encode_prompt
from onsft.engine.decoding import DecodeStats, SamplingConfig, generate
from onsft.organism.tasks import retention_test
from onsft.runtime.models import load_model, load_tokenizer
from onsft.runtime.records import write_json_atomic

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rounds  # noqa: E402


def workload(args) -> dict[str, list[int]]:
    short, long = args.short_tokens, args.long_tokens
    n, n_long = args.examples, args.long_examples
    total = (n - n_long) * short + n_long * long
    if total % n:
        sys.exit(f"the uniform workload needs {total} tokens to split evenly over {n} examples")
    if args.long_at == "spread":
        every = n // n_long
        skewed = [long if position % every == every - 1 else short for position in range(n)]
    else:
        skewed = [long] * n_long + [short] * (n - n_long)
        skewed = skewed if args.long_at == "first" else skewed[::-1]
    return {"skewed": skewed, "uniform": [total // n] * n}


def step_cost(times: dict, counts: dict, clock: str) -> dict:
    """Per round, the least-squares line time = a x decode_steps + c through the variants (see the module doc):
    a in ms per step, c in seconds, c per row-step in ms, and the static / continuous ratio it implies."""
    names = list(counts)
    steps = [counts[name]["decode_steps"] for name in names]
    row_steps = counts[names[0]]["row_steps"]
    mean_steps = sum(steps) / len(steps)
    fits = {"step_ms": [], "rest_s": [], "rest_per_row_step_ms": [], "fixed_share_continuous": []}
    for r in range(len(times[names[0]][clock])):
        ys = [times[name][clock][r] for name in names]
        mean_y = sum(ys) / len(ys)
        a = sum((x - mean_steps) * (y - mean_y) for x, y in zip(steps, ys)) / sum((x - mean_steps) ** 2 for x in steps)
        c = mean_y - a * mean_steps
        fits["step_ms"].append(1e3 * a)
        fits["rest_s"].append(c)
        fits["rest_per_row_step_ms"].append(1e3 * c / row_steps)
        continuous = a * counts["continuous"]["decode_steps"]
        fits["fixed_share_continuous"].append(continuous / (continuous + c))
    return {name: rounds.spread(values) for name, values in fits.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default="organism", help="a model onsft loads (alias, folder, .gguf); default: the organism"
    )
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--long-examples", type=int, default=8)
    parser.add_argument("--short-tokens", type=int, default=16)
    parser.add_argument("--long-tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument(
        "--long-at",
        choices=("spread", "first", "last"),
        default="spread",
        help="where the long examples are in admission order: every 8th (the headline), all first (the best "
        "case for a first-come schedule: their 256 steps overlap everything else), or all last",
    )
    parser.add_argument("--rounds", type=int, default=5, help="every variant is timed once per round (>= 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 2 rounds: checks the script runs")
    parser.add_argument("--out", default=None, help="default benchmarks/results/skewed[-MODEL].json")
    args = parser.parse_args(argv)
    started = rounds.clocks()
    if args.out is None:
        name = "" if args.model == "organism" else "-" + (Path(args.model).name.removesuffix(".gguf") or "model")
        args.out = str(Path(__file__).parent / "results" / f"skewed{name}.json")
    if args.quick:
        args.examples, args.long_examples, args.short_tokens, args.long_tokens = 8, 2, 4, 8
        args.batch, args.rounds = 4, 2
    torch.set_num_threads(args.threads)
    clock = rounds.clock_for(args.threads)

    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model)
    loaded = rounds.since(started)
    rows = retention_test(args.examples, seed=0)
    prompts = [encode_prompt(tokenizer, [{"role": "user", "content": row["prompt"]}]) for row in rows]
    # Admission goes by prompt length (longest first, ties by index); lengths are assigned in that order.
    admission = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    lengths = workload(args)
    limits = {name: [0] * len(prompts) for name in lengths}
    for name, per_position in lengths.items():
        for position, i in enumerate(admission):
            limits[name][i] = per_position[position]
    config = SamplingConfig(
        max_new_tokens=args.long_tokens,
        min_new_tokens=args.long_tokens,
        temperature=0.0,
        batch_size=args.batch,
        repetition_count=0,
    )
    variants = {
        "static": ("skewed", "static"),
        "continuous": ("skewed", "continuous"),
        "uniform": ("uniform", "continuous"),
    }
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"{args.model}: {n_params / 1e6:.1f}M params, loaded in {loaded['wall']:.1f} s; {args.examples} examples, batch {args.batch}; skewed "
        f"{args.examples - args.long_examples} x {args.short_tokens} + {args.long_examples} x {args.long_tokens} "
        f"tokens (long ones {args.long_at}), uniform {args.examples} x {lengths['uniform'][0]}; prompts "
        f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens; clock: {rounds.clock_words(clock, args.threads)}"
    )

    def run(name: str):
        workload_name, schedule = variants[name]
        stats = DecodeStats()
        out = generate(
            model, tokenizer, prompts, config, schedule=schedule, token_limits=limits[workload_name], stats=stats
        )
        tokens = sum(g.n_tokens for g in out)
        assert tokens == sum(limits[workload_name]), (name, tokens)
        return [g.token_ids for g in out], stats

    run("uniform")  # warm-up (allocator, first calls)
    # Greedy decoding is deterministic, so the last round's tokens stand for every round's.
    times, last = rounds.in_turns({name: (lambda name=name: run(name)) for name in variants}, args.rounds)
    if last["static"][0] != last["continuous"][0]:
        sys.exit("static and continuous schedules gave different tokens")
    tokens = {name: sum(limits[w]) for name, (w, _) in variants.items()}  # skewed and uniform: the same count
    counts = {}
    for name, (_, stats) in last.items():
        counts[name] = {
            "tokens": tokens[name],
            "decode_steps": stats.decode_steps,
            "row_steps": stats.row_steps,
            "idle_slot_share": round(stats.idle_share, 4),
            "admissions": stats.admissions,
            "row_moves": stats.copies.row_moves,
            "moved_mb": round(stats.copies.moved_bytes / 2**20, 2),
            "whole_copies": stats.copies.whole_copies,
            "whole_copy_mb": round(stats.copies.whole_bytes / 2**20, 2),
        }
    ratios = {
        "continuous/static": rounds.speedup(times, "continuous", "static", clock),
        "continuous/uniform": rounds.speedup(times, "continuous", "uniform", clock),
        "static/uniform": rounds.speedup(times, "static", "uniform", clock),
    }
    rates = {name: rounds.spread([tokens[name] / t for t in times[name][clock]]) for name in variants}
    print("\ntokens per second, median [min, max] over rounds:")
    for name, s in rates.items():
        c = counts[name]
        print(
            f"  {name:10s} {s['median']:8.0f} [{s['min']:.0f}, {s['max']:.0f}]   {c['decode_steps']} steps, "
            f"{c['idle_slot_share']:.0%} of slot-steps idle, {c['admissions']} admissions"
        )
    print("ratios (target: continuous/static >= 2.5, continuous/uniform >= 0.85):")
    for name, ratio in ratios.items():
        print(f"  {name:20s} {rounds.show(ratio)}")
    cost = step_cost(times, counts, clock)
    print(
        f"time = a x steps + c: a {cost['step_ms']['median']:.2f} ms per step, c {cost['rest_s']['median']:.2f} s "
        f"({cost['rest_per_row_step_ms']['median']:.3f} ms per row-step at most); fixed share of continuous "
        f"{cost['fixed_share_continuous']['median']:.0%}"
    )

    result = {
        "benchmark": "skewed",
        "model": args.model,
        "settings": {**vars(args), "params": n_params, "greedy": True},
        "clock": clock,
        "clock_words": rounds.clock_words(clock, args.threads),
        "tokens_per_second": rates,
        "seconds": times,
        "ratios": ratios,
        "targets": {"continuous/static": 2.5, "continuous/uniform": 0.85},
        "counts": counts,
        "step_cost": cost,
        "static_equals_continuous": True,
        "machine": rounds.machine(),
        "load_seconds": loaded,
        "run_seconds": rounds.since(started),
    }
    write_json_atomic(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
