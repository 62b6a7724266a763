"""Audit scoring cost against a plain no-grad forward that returns the full logits.

Same model (a Llama built from a config with a real vocabulary: 49152 by default), same padded batches.
Variants:
  forward      model(input_ids, attention_mask).logits            the baseline (computes logits, no scores)
  audit        onsft.engine.scoring.score_batch: backbone + streamed LM head on response positions, phi/H/Var
  audit_fused  the same with the tile arithmetic fused by torch.compile (`onsft audit --compile true`;
               its one-off compile happens in the warm-up and is reported apart)
  audit_all    the streamed head on every position (prompt too): the same token count as `forward`
  naive_ddt    full logits, then float32 log-softmax statistics (what the reference code does)

Throughput: all variants interleaved in one process, `--rounds` times, median seconds per pass over the
batches (wall clock, and this process's CPU time, which is steadier on a shared machine); tokens/s counts
every (padded-batch) token, the same for all variants. Peak memory: each variant
in a fresh subprocess, the rise of the resident-set high-water mark over the set-up's resident set
(VmHWM reset through /proc/self/clear_refs after set-up; ru_maxrss as a fallback). Prints ratios
against `forward`, writes JSON (default benchmarks/results/audit.json).

    .venv/bin/python benchmarks/audit.py [--batch_size 8 --seq_len 512 --batches 4 --rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from onsft.engine import scoring
from onsft.formulas import ddt

VARIANTS = ("forward", "audit", "audit_fused", "audit_all", "naive_ddt")


def build(args):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=max(2048, args.seq_len),
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(args.batches):
        items = []
        for row in range(args.batch_size):
            # Ragged rows (so padding happens) with prompts of varied length, like a real dataset.
            length = args.seq_len - int(torch.randint(0, args.seq_len // 8, (1,), generator=generator))
            prompt = int(torch.randint(args.seq_len // 16, args.seq_len // 4, (1,), generator=generator))
            ids = torch.randint(0, args.vocab, (length,), generator=generator).tolist()
            items.append(scoring.Item(row, ids, prompt))
        ids, mask = scoring._pad_batch(items, 0, "cpu")
        batches.append((items, ids, mask))
    return model, batches


def runner(name: str, model, args):
    head = scoring.find_head(model)
    assert head is not None

    def forward(items, ids, mask):
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    def scored(items, ids, mask):
        return scoring.score_batch(model, head, items, [1.0], 0, args.vocab_chunk, args.row_chunk)

    def fused(items, ids, mask):
        return scoring.score_batch(model, head, items, [1.0], 0, args.vocab_chunk, args.row_chunk, fused=True)

    def every_position(items, ids, mask):
        # Every position as if it were a response token: the same head work as `forward`.
        full = [scoring.Item(it.index, it.ids, 1) for it in items]
        return scoring.score_batch(model, head, full, [1.0], 0, args.vocab_chunk, args.row_chunk)

    def naive(items, ids, mask):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        positions, targets = scoring._response_positions(items, ids.shape[1])
        picked = logits.reshape(-1, logits.shape[-1])[torch.tensor(positions)]
        return ddt.token_stats(picked, torch.tensor(targets))

    return {"forward": forward, "audit": scored, "audit_fused": fused, "audit_all": every_position, "naive_ddt": naive}[
        name
    ]


def one_pass(run, batches) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) for one pass over the batches."""
    start, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for items, ids, mask in batches:
            out = run(items, ids, mask)
            del out
    return time.perf_counter() - start, time.process_time() - cpu


def warm_up(run, batches) -> float:
    """One small batch (two rows): compiles / initialises without setting a memory peak."""
    items, ids, mask = batches[0]
    return one_pass(run, [(items[:2], ids[:2], mask[:2])])[0]


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def measure_memory(name: str, args) -> dict:
    """Run in a fresh process: peak resident memory added by one pass of variant `name`."""
    model, batches = build(args)
    run = runner(name, model, args)
    warm_up(run, batches)
    import gc

    gc.collect()
    baseline = _status_kb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
        method = "VmHWM after clear_refs"
    except OSError:
        baseline, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"
    one_pass(run, batches)
    peak = _status_kb("VmHWM") if method.startswith("VmHWM") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_delta_mb": (peak - baseline) / 1024, "method": method}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--vocab_chunk", type=int, default=0, help="0 = onsft.formulas.ddt's default for the device")
    parser.add_argument("--row_chunk", type=int, default=0, help="0 = onsft.formulas.ddt's default for the device")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "audit.json"))
    parser.add_argument("--memory_of", default=None, help=argparse.SUPPRESS)  # internal: child process
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_of:
        print(json.dumps(measure_memory(args.memory_of, args)))
        return 0

    model, batches = build(args)
    tokens = sum(int(mask.numel()) for _, _, mask in batches)
    real = sum(int(mask.sum()) for _, _, mask in batches)
    response = sum(it.n_response for items, _, _ in batches for it in items)
    runs = {name: runner(name, model, args) for name in VARIANTS}
    warm = {name: warm_up(run, batches) for name, run in runs.items()}
    seconds = {name: [] for name in VARIANTS}
    cpu_seconds = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name, run in runs.items():
            wall, cpu = one_pass(run, batches)
            seconds[name].append(wall)
            cpu_seconds[name].append(cpu)
    median = {name: statistics.median(v) for name, v in seconds.items()}
    cpu_median = {name: statistics.median(v) for name, v in cpu_seconds.items()}

    memory = {}
    for name in VARIANTS:
        child = [sys.executable, __file__, "--memory_of", name] + [
            f"--{k}={v}" for k, v in vars(args).items() if k not in ("memory_of", "out", "rounds")
        ]
        done = subprocess.run(child, capture_output=True, text=True, check=True)
        memory[name] = json.loads(done.stdout.strip().splitlines()[-1])

    base_time, base_memory = median["forward"], memory["forward"]["peak_delta_mb"]
    result = {
        "model": {"vocab": args.vocab, "hidden": args.hidden, "layers": args.layers},
        "batches": {
            "count": args.batches,
            "batch_size": args.batch_size,
            "padded_tokens": tokens,
            "real_tokens": real,
            "response_tokens": response,
        },
        "tiles": {
            "row_chunk": args.row_chunk or ddt.default_chunks("cpu")[0],
            "vocab_chunk": args.vocab_chunk or ddt.default_chunks("cpu")[1],
        },
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "variants": {
            name: {
                "seconds_median": median[name],
                "seconds_all": seconds[name],
                "warm_up_seconds": warm[name],
                "tokens_per_s": tokens / median[name],
                "throughput_ratio_vs_forward": base_time / median[name],
                "cpu_seconds_median": cpu_median[name],
                "cpu_throughput_ratio_vs_forward": cpu_median["forward"] / cpu_median[name],
                "peak_delta_mb": memory[name]["peak_delta_mb"],
                "memory_ratio_vs_forward": memory[name]["peak_delta_mb"] / base_memory,
                "memory_method": memory[name]["method"],
            }
            for name in VARIANTS
        },
    }
    print(
        f"{tokens} padded tokens per pass ({response} response tokens), vocab {args.vocab}, "
        f"{torch.get_num_threads()} threads, median of {args.rounds}"
    )
    print(
        f"{'variant':<12} {'s/pass':>8} {'tok/s':>9} {'speed vs fwd':>13} {'cpu-time speed':>15} "
        f"{'peak MB':>9} {'mem vs fwd':>11}"
    )
    for name, v in result["variants"].items():
        print(
            f"{name:<12} {v['seconds_median']:8.3f} {v['tokens_per_s']:9.0f} {v['throughput_ratio_vs_forward']:12.2f}x "
            f"{v['cpu_throughput_ratio_vs_forward']:14.2f}x {v['peak_delta_mb']:9.1f} {v['memory_ratio_vs_forward']:10.2f}x"
        )
    print(f"one-off warm-up of audit_fused (torch.compile): {warm['audit_fused']:.1f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
