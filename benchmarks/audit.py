"""Audit (DDT) scoring cost against a plain no-grad forward that returns the full logits, measured fairly.

Same model (a Llama built from a config with a real vocabulary: 49152 by default), same padded batches.
Variants:
  forward      model(input_ids, attention_mask).logits       the baseline: its LM head sees EVERY position
  audit_all    onsft's scorer (`engine.scoring.score_batch`: backbone + streamed LM head, phi/H/Var) on every
               position (prompt too): the same head work as `forward`, so the ratio compares like with like
  audit        the same on the response positions only (what `onsft audit` does): less head work
  audit_fused  `audit` with the tile arithmetic fused by torch.compile (`onsft audit --compile true`; its
               one-off compile happens in the warm-up and is reported apart)
  naive_ddt    full logits, then float32 log-softmax statistics on the response positions (the reference code)

Throughput: the variants take turns in this one process, `--rounds` rounds with the order rotated
(benchmarks/rounds.py); each round gives a paired throughput ratio forward_time / variant_time, reported as
the median over rounds with range and IQR. Clock: this process's CPU time at one torch thread (default).
Headline: audit_all vs forward (equal token counts), next to audit vs forward (response positions only).
The scores are checked against naive_ddt's (max |phi difference| in the JSON).

Peak memory: each variant in a fresh subprocess (MALLOC_MMAP_THRESHOLD_ fixed, so freed tensors go back to
the system), the rise of the resident-set high-water mark over the set-up's resident set (VmHWM reset
through /proc/self/clear_refs after a two-row warm-up).

    python benchmarks/audit.py [--batch_size 8 --seq_len 512 --batches 2 --rounds 5]
    python benchmarks/audit.py --quick      # tiny sizes, a few seconds (tests/test_benchmarks.py)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from onsft.engine import scoring
from onsft.formulas import ddt
from onsft.runtime.records import write_json_atomic

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rounds  # noqa: E402

VARIANTS = ("forward", "audit_all", "audit", "audit_fused", "naive_ddt")


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
    """A function scoring one batch the way `name` does."""
    head = scoring.find_head(model)
    assert head is not None

    def forward(items, ids, mask):
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    def scored(items, ids, mask, fused=False):
        return scoring.score_batch(model, head, items, [1.0], 0, args.vocab_chunk, args.row_chunk, fused=fused)[0]

    def every_position(items, ids, mask):
        # A prompt of one token: every later position is scored, as the forward's head sees every position.
        return scored([scoring.Item(it.index, it.ids, 1) for it in items], ids, mask)

    def naive(items, ids, mask):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        positions, targets = scoring._response_positions(items, ids.shape[1])
        picked = logits.reshape(-1, logits.shape[-1])[torch.tensor(positions)]
        return ddt.token_stats(picked.float(), torch.tensor(targets))

    return {
        "forward": forward,
        "audit": scored,
        "audit_fused": lambda *b: scored(*b, fused=True),
        "audit_all": every_position,
        "naive_ddt": naive,
    }[name]


def one_pass(run, batches, keep: bool = False) -> list:
    """Score every batch; each output is dropped before the next batch unless `keep` (as a caller streaming
    the batches would: holding a forward's full logits would double its memory and change its timing)."""
    kept = []
    with torch.inference_mode():
        for batch in batches:
            out = run(*batch)
            if keep:
                kept.append(out)
            del out
    return kept


def head_positions(batches) -> dict:
    """Positions whose next-token distribution each variant computes (the LM head's work)."""
    padded = sum(int(mask.numel()) for _, _, mask in batches)
    real = sum(len(it.ids) for items, _, _ in batches for it in items)
    rows = sum(len(items) for items, _, _ in batches)
    response = sum(it.n_response for items, _, _ in batches for it in items)
    return {
        "forward": padded,
        "audit_all": real - rows,
        "audit": response,
        "audit_fused": response,
        "naive_ddt": padded,
    }


def measure_memory(name: str, args) -> dict:
    """Run in a fresh process: peak resident MiB added by one pass of variant `name`."""
    model, batches = build(args)
    run = runner(name, model, args)
    items, ids, mask = batches[0]
    one_pass(run, [(items[:2], ids[:2], mask[:2])])  # compiles / initialises without setting a peak
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = rounds.status_kb("VmRSS")
    one_pass(run, batches)
    return {"peak_delta_mib": (rounds.status_kb("VmHWM") - before) / 1024}


def memory(args) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"), env.get("PYTHONPATH", "")])
    sizes = [f"--{k}={getattr(args, k)}" for k in ("vocab", "hidden", "layers", "batch_size", "seq_len", "batches")]
    sizes += [f"--{k}={getattr(args, k)}" for k in ("vocab_chunk", "row_chunk", "threads")]
    out = {}
    for name in args.memory_variants.split(","):
        if name and args.quick:  # in this process (no fresh interpreter to start): checks the code, not the memory
            out[name] = measure_memory(name, args)["peak_delta_mib"]
        elif name:
            child = [sys.executable, __file__, *sizes, "--memory_of", name]
            done = subprocess.run(child, capture_output=True, text=True, check=True, env=env)
            out[name] = json.loads(done.stdout.strip().splitlines()[-1])["peak_delta_mib"]
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--vocab_chunk", type=int, default=0, help="0 = onsft.formulas.ddt's default for the device")
    parser.add_argument("--row_chunk", type=int, default=0, help="0 = onsft.formulas.ddt's default for the device")
    parser.add_argument("--threads", type=int, default=1, help="torch threads; 1 = CPU-time clock, else wall")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="the first is the baseline")
    parser.add_argument("--memory_variants", default=",".join(VARIANTS))
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 2 rounds: checks the script runs")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "audit.json"))
    parser.add_argument("--memory_of", default=None, help=argparse.SUPPRESS)  # internal: the child process
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_of:
        print(json.dumps(measure_memory(args.memory_of, args)))
        return {}
    if args.quick:
        args.vocab, args.hidden, args.batch_size, args.seq_len, args.batches, args.rounds = 2048, 64, 4, 128, 2, 2
        args.variants, args.memory_variants = "forward,audit_all,audit,naive_ddt", "audit"
    clock = rounds.clock_for(args.threads)
    names = args.variants.split(",")
    base = names[0]

    model, batches = build(args)
    runs = {name: runner(name, model, args) for name in names}
    warm = {name: rounds.timed(lambda r=run: one_pass(r, batches[:1]))[1] for name, run in runs.items()}
    # The scores agree with full-logit float32 statistics (the comparison is between equal results).
    checked = {}
    if "naive_ddt" in runs:
        reference = torch.cat([s.phi for s in one_pass(runs["naive_ddt"], batches, keep=True)])
        for name in ("audit", "audit_fused"):
            if name in runs:
                phi = torch.cat([s.phi for s in one_pass(runs[name], batches, keep=True)])
                checked[name] = float((phi.double() - reference.double()).abs().max())
    times, _ = rounds.in_turns({name: lambda r=run: one_pass(r, batches) for name, run in runs.items()}, args.rounds)
    positions = head_positions(batches)
    tokens = positions["forward"]
    mem = memory(args)
    result = {
        "clock": clock,
        "clock_words": rounds.clock_words(clock, args.threads),
        "model": {"vocab": args.vocab, "hidden": args.hidden, "layers": args.layers},
        "batches": {"count": args.batches, "batch_size": args.batch_size, "seq_len": args.seq_len},
        "head_positions": {name: positions[name] for name in names},
        "tiles": {
            "row_chunk": args.row_chunk or ddt.default_chunks("cpu")[0],
            "vocab_chunk": args.vocab_chunk or ddt.default_chunks("cpu")[1],
        },
        "max_abs_phi_difference_to_naive_fp32": checked,
        "throughput_ratio_vs_" + base: {name: rounds.speedup(times, name, base, clock) for name in names[1:]},
        "variants": {
            name: {
                "seconds_per_pass": rounds.spread(times[name][clock]),
                "padded_tokens_per_s": tokens / rounds.spread(times[name][clock])["median"],
                "warm_up_wall_seconds": warm[name],
                "peak_delta_mib": mem.get(name),
            }
            for name in names
        },
        "times": times,
        "memory_ratio_vs_" + base: {n: mem[n] / mem[base] for n in mem if base in mem and n != base},
        "settings": {k: v for k, v in vars(args).items() if k not in ("memory_of", "out")},
        "machine": rounds.machine(),
    }
    print(
        f"vocab {args.vocab}, {args.batches} batches of {args.batch_size} x ~{args.seq_len} tokens "
        f"({tokens} padded); {args.rounds} rounds in turns; clock: {result['clock_words']}"
    )
    print(f"{'variant':<12} {'head positions':>15} {'s/pass':>8} {'peak MiB':>9}  throughput vs {base} [range] (IQR)")
    for name in names:
        v = result["variants"][name]
        ratio = result["throughput_ratio_vs_" + base].get(name)
        peak = "" if v["peak_delta_mib"] is None else f"{v['peak_delta_mib']:.0f}"
        print(
            f"{name:<12} {positions[name]:>15} {v['seconds_per_pass']['median']:8.3f} {peak:>9}  "
            + (rounds.show(ratio) if ratio else "(baseline)")
        )
    for name, diff in checked.items():
        print(f"max |phi({name}) - phi(naive fp32)| = {diff:.1e}")
    if "audit_fused" in warm:
        print(f"one-off warm-up of audit_fused (torch.compile): {warm['audit_fused']:.1f} s wall")
    write_json_atomic(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
