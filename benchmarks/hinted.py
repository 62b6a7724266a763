"""Throughput of batched hinted decoding against two baselines measured in the same run.

(a) `onsft.engine.hinted.hinted_decode`: the batch's hinted and plain contexts as one padded batch of 2B rows
    through one copy of the weights with one KV cache (the hinted prompts' shared instruction is
    prefilled once per batch; `--instruction-len 0` measures prompts with nothing shared).
(b) `transformers` `model.generate` on the plain contexts alone (same batch, same model, same sampling):
    the cost of ordinary sampling, which hinted decoding must stay within a small factor of.
(c) The reference algorithm re-implemented faithfully (github.com/zhangmiaosen2000/Towards-On-Policy-SFT,
    HintedDecoding/sampling/hinted_decoding.py): one example at a time, two model copies, no KV cache
    (both contexts recomputed in full at every step), its nucleus-then-temperature processor, per-token
    text decoding for the marker check and a repetition scan every 100 tokens.
    (c) is slow, so it runs on fewer examples and two short segments: from the prompt, and from a
    prefix of (new_tokens - segment) tokens. Its per-step cost grows linearly with the sequence, so
    the mean of the two segments' per-token times estimates the per-token time over all new_tokens.

Every rate is generated tokens per second. EOS is suppressed (min_new_tokens in (a) and (b), a masked
EOS in (c)) so every row generates exactly new_tokens tokens. A random model falls into loops that a
trained one would not, so the repetition detector runs (its cost counts) with a count no loop reaches.
Timing: one torch thread and process CPU time by default, so that other jobs on a shared machine do
not decide the ratios; wall-clock rates are reported beside them. (a) and (b) are repeated and the
best run counts.

Model: a randomly initialised Llama of a realistic shape for a CPU (hidden 512, 4 layers, 8 heads with
4 KV heads, MLP 1408, vocabulary 4096: 16M parameters, float32): big enough that matrix products and
KV-cache reads, not Python overhead, dominate a step, as they do for real models; small enough for a
2-core run. Its head is scaled 10x so next-token distributions are peaked like a trained model's
(~2.2 nats), which makes lambda vary and keeps top-p nuclei small. Prompts are random token ids shaped
like the rewrite pipeline's: plain = question (48-160 tokens); hinted = a shared 384-token rewriting
instruction + the question + a 128-384-token reference (the reference code's instruction alone is
~700 tokens), so hinted prompts are ~7x longer than plain ones.

    .venv/bin/python benchmarks/hinted.py [--batch 16 --new-tokens 256 --out benchmarks/results/hinted.json]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import platform
import random
import string
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer, decoders, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from onsft.engine.decoding import SamplingConfig, generate
from onsft.engine.hinted import HintedConfig, hinted_decode
from onsft.runtime.records import write_json_atomic

SPECIALS = ["<pad>", "<eos>", "<system>", "<user>", "<assistant>"]


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Local tokenizer of exactly `vocab_size` tokens: specials, printable characters, then letter
    pairs and triples (so decoding is realistic text and the answer marker can be matched)."""
    chars = sorted(set(string.printable) - set("\x0b\x0c\r"))
    pieces = ("".join(p) for n in (2, 3) for p in itertools.product(string.ascii_lowercase, repeat=n))
    tokens = SPECIALS + chars
    tokens += list(itertools.islice(pieces, vocab_size - len(tokens)))
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[], unk_token=None))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")


def build_model(args) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=4096,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    # At the init scale (std 0.02) next-token distributions are nearly uniform; a trained model's are
    # peaked (a few nats). Scaling the head gives that (mean entropy ~2.2 nats at 10x), so lambda
    # varies and top-p keeps a small nucleus, as in real runs.
    with torch.no_grad():
        model.lm_head.weight.mul_(args.head_scale)
    return model


def make_prompts(args, n: int, seed: int = 0):
    """Random-token prompts shaped like the rewrite pipeline's: the plain prompt is the question in the
    chat template; the hinted prompt is the same rewriting instruction for every example (the reference
    code's system prompt is ~700 tokens), then the question and its reference solution."""
    rng = random.Random(seed)
    instruction = [rng.randrange(5, args.vocab) for _ in range(args.instruction_len)]
    plain, hinted = [], []
    for _ in range(n):
        question = [rng.randrange(5, args.vocab) for _ in range(rng.randint(*args.question_len))]
        reference = [rng.randrange(5, args.vocab) for _ in range(rng.randint(*args.reference_len))]
        plain.append([3] + question + [4])  # <user> question <assistant>
        hinted.append([2] + instruction + [3] + question + reference + [4])  # <system> ... <user> ... <assistant>
    return plain, hinted


# ---------------------------------------------------------------------------------------------
# (c) the reference algorithm, one example at a time, no KV cache, two copies of the model
# ---------------------------------------------------------------------------------------------


def reference_nucleus(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The reference's NucleusProcessor: top-p on the raw scores, then softmax(scores / temperature)."""
    sorted_logits, sorted_indices = torch.sort(logits, descending=True)
    cumulative = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    remove = cumulative > top_p
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = False
    sorted_logits[remove] = -1e20
    filtered = torch.gather(sorted_logits, -1, sorted_indices.argsort(-1))
    return F.softmax(filtered / temperature, dim=-1)


def repeated(tokens: list[int], k: int = 30, m: int = 5) -> bool:
    counts: dict[tuple[int, ...], int] = defaultdict(int)
    for i in range(len(tokens) - k):
        counts[tuple(tokens[i : i + k])] += 1
        if counts[tuple(tokens[i : i + k])] >= m:
            return True
    return False


@torch.no_grad()
def reference_hinted(
    hinted_model,
    plain_model,
    tokenizer,
    hinted: list[int],
    plain: list[int],
    steps: int,
    beta: float,
    temperature: float,
    top_p: float,
    marker: str,
    eos: int,
    prefix: list[int] | None = None,
    repetition_count: int = 5,
) -> list[int]:
    """`steps` tokens of the reference loop after an optional already-generated `prefix`."""
    generated = list(prefix or [])
    text = tokenizer.decode(generated)
    log_vocab = torch.log(torch.tensor(float(hinted_model.config.vocab_size)))
    plain_only = False
    for step in range(steps):
        if len(generated) // 100 > (len(generated) - 1) // 100 and repeated(generated, m=repetition_count):
            break
        if marker and marker in text:
            plain_only = True
        # The reference re-runs the whole sequence of each context every step (use_cache=False).
        logits_p = plain_model(input_ids=torch.tensor([plain + generated])).logits[0, -1]
        if plain_only:
            mixed = F.log_softmax(logits_p, dim=-1)
        else:
            logits_h = hinted_model(input_ids=torch.tensor([hinted + generated])).logits[0, -1]
            log_h = F.log_softmax(logits_h, dim=-1)
            probs_h = log_h.exp()
            entropy = -(probs_h * torch.log(probs_h + 1e-20)).sum()
            lam = 0.0 if (step == 0 and not prefix) else torch.clamp(beta * entropy / log_vocab, 0.0, 1.0)
            mixed = (1 - lam) * log_h + lam * F.log_softmax(logits_p, dim=-1)
        mixed[eos] = -float("inf")  # equal token counts across (a), (b), (c)
        token = int(torch.multinomial(reference_nucleus(mixed, temperature, top_p), 1))
        generated.append(token)
        text += tokenizer.decode([token])
    return generated[len(prefix or []) :]


# ---------------------------------------------------------------------------------------------


def timed(fn):
    """(CPU seconds of this process, wall seconds, result)."""
    cpu, wall = time.process_time(), time.perf_counter()
    result = fn()
    return time.process_time() - cpu, time.perf_counter() - wall, result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1408)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--head-scale", type=float, default=10.0, help="lm_head multiplier (peakedness)")
    parser.add_argument("--question-len", type=int, nargs=2, default=[48, 160])
    parser.add_argument("--reference-len", type=int, nargs=2, default=[128, 384])
    parser.add_argument("--instruction-len", type=int, default=384, help="shared rewriting instruction")
    parser.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="(a) and (b) are timed this many times (interleaved); the best time counts.",
    )
    parser.add_argument("--ref-examples", type=int, default=2, help="examples timed for baseline (c)")
    parser.add_argument("--ref-segment", type=int, default=16, help="tokens per timed segment of (c)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (0 = torch's default). One thread and CPU time make the ratios "
        "robust to other processes on a shared machine; wall times are reported too.",
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "hinted.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    tokenizer = build_tokenizer(args.vocab)
    model = build_model(args)
    plain, hinted = make_prompts(args, args.batch)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"model: {n_params / 1e6:.1f}M params, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; "
        f"batch {args.batch}, {args.new_tokens} new tokens, torch threads {torch.get_num_threads()}"
    )
    print(
        f"prompt tokens: plain mean {sum(map(len, plain)) / len(plain):.0f}, "
        f"hinted mean {sum(map(len, hinted)) / len(hinted):.0f}"
    )

    # Reference demo settings: beta 3, temperature 0.3, top-p 0.95, the "\boxed{" marker. A random
    # model falls into loops that a trained one would not; the repetition detector still runs (its
    # per-step cost is part of the measurement) but with a count no loop reaches, so no row stops early.
    hd_config = HintedConfig(
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        batch_size=args.batch,
        seed=0,
        repetition_count=10**9,
    )

    def run_hinted():
        return hinted_decode(model, tokenizer, plain, hinted, hd_config)

    def run_ours_plain():
        config = SamplingConfig(
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            temperature=0.3,
            top_p=0.95,
            batch_size=args.batch,
            repetition_count=10**9,
        )
        return generate(model, tokenizer, plain, config)

    def run_hf():
        width = max(map(len, plain))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in plain])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in plain])
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=mask,
                do_sample=True,
                temperature=0.3,
                top_p=0.95,
                top_k=None,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                pad_token_id=0,
            )
        return out[:, width:]

    # Warm-up: first calls pay for lazy initialisation (kernels, allocator).
    warm = HintedConfig(**{**hd_config.__dict__, "max_new_tokens": 4, "min_new_tokens": 4})
    hinted_decode(model, tokenizer, plain[:2], hinted[:2], warm)
    run_hf_small = model.generate(torch.tensor([plain[0]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    del run_hf_small

    # With one thread, CPU time is what the work costs, whatever else runs on the machine; with more,
    # idle-waiting threads blur it, so wall time is used.
    clock = "cpu" if torch.get_num_threads() == 1 else "wall"
    times: dict[str, dict[str, list[float]]] = defaultdict(lambda: {"cpu": [], "wall": []})

    def record(name, fn):
        cpu, wall, result = timed(fn)
        times[name]["cpu"].append(cpu)
        times[name]["wall"].append(wall)
        return result

    for _ in range(args.repeats):
        results = record("hinted", run_hinted)
        hf_out = record("hf_generate", run_hf)
        ours_plain = record("ours_generate", run_ours_plain)
    counts = [r.n_tokens for r in results]
    assert counts == [args.new_tokens] * args.batch, ("rows stopped early", [r.finish_reason for r in results])
    assert hf_out.shape == (args.batch, args.new_tokens)
    assert all(g.n_tokens == args.new_tokens for g in ours_plain)
    generated = args.batch * args.new_tokens

    # (c): separate copies of the weights, as the reference loads the model twice.
    hinted_copy, plain_copy = copy.deepcopy(model), copy.deepcopy(model)
    seg = args.ref_segment
    rng = random.Random(1)
    kwargs = dict(beta=3.0, temperature=0.3, top_p=0.95, marker="\\boxed{", eos=1, repetition_count=10**9)
    for i in range(args.ref_examples):
        prefix = [rng.randrange(5, args.vocab) for _ in range(args.new_tokens - seg)]
        record(
            "reference_early",
            lambda i=i: reference_hinted(hinted_copy, plain_copy, tokenizer, hinted[i], plain[i], seg, **kwargs),
        )
        record(
            "reference_late",
            lambda i=i, prefix=prefix: reference_hinted(
                hinted_copy, plain_copy, tokenizer, hinted[i], plain[i], seg, prefix=prefix, **kwargs
            ),
        )

    def rate(name, tokens, best=True, which=clock):
        values = times[name][which]
        return tokens / (min(values) if best else sum(values))

    ref_tokens = seg * args.ref_examples
    rates, wall_rates = {}, {}
    for which, out in ((clock, rates), ("wall", wall_rates)):
        early = rate("reference_early", ref_tokens, best=False, which=which)
        late = rate("reference_late", ref_tokens, best=False, which=which)
        out.update(
            {
                "hinted_tokens_per_s": rate("hinted", generated, which=which),
                "hf_generate_plain_tokens_per_s": rate("hf_generate", generated, which=which),
                "ours_generate_plain_tokens_per_s": rate("ours_generate", generated, which=which),
                # Mean per-token time of the first and last segments = the mean over all new tokens.
                "reference_tokens_per_s": 2 / (1 / early + 1 / late),
                "reference_early_segment_tokens_per_s": early,
                "reference_late_segment_tokens_per_s": late,
            }
        )
    ratios = {
        "hinted_vs_hf_generate": rates["hinted_tokens_per_s"] / rates["hf_generate_plain_tokens_per_s"],
        "hinted_vs_reference": rates["hinted_tokens_per_s"] / rates["reference_tokens_per_s"],
        "ours_generate_vs_hf_generate": rates["ours_generate_plain_tokens_per_s"]
        / rates["hf_generate_plain_tokens_per_s"],
    }
    print(f"rates from {clock} time (tokens/s); wall-time rates in brackets")
    for name, value in rates.items():
        print(f"{name:40s} {value:10.1f}   [{wall_rates[name]:.1f}]")
    for name, value in ratios.items():
        print(f"{name:40s} {value:10.2f}x")
    targets = {
        "hinted_vs_hf_generate >= 0.5": ratios["hinted_vs_hf_generate"] >= 0.5,
        "hinted_vs_reference >= 20": ratios["hinted_vs_reference"] >= 20,
    }
    for name, ok in targets.items():
        print(f"target {name}: {'met' if ok else 'MISSED'}")
    report = {
        "benchmark": "hinted decoding throughput (generated tokens/s)",
        "settings": {
            **vars(args),
            "params_millions": round(n_params / 1e6, 2),
            "plain_prompt_mean": sum(map(len, plain)) / len(plain),
            "hinted_prompt_mean": sum(map(len, hinted)) / len(hinted),
            "hinted_config": {k: v for k, v in hd_config.__dict__.items()},
        },
        "clock": clock,
        "times_s": dict(times),
        "rates": rates,
        "wall_rates": wall_rates,
        "ratios": ratios,
        "targets_met": targets,
        "hinted_stats": {
            "handovers": sum(r.handed_over for r in results),
            "mean_lambda": sum(r.mean_lambda for r in results) / len(results),
            "finish_reasons": sorted({r.finish_reason for r in results}),
        },
        "environment": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": sys.version.split()[0],
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average": os.getloadavg(),
        },
    }
    write_json_atomic(args.out, report)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
