"""Hinted decoding's throughput against two baselines, measured in the same run, in turns.

Variants (every rate is generated tokens per second; EOS is suppressed, so every row makes exactly L tokens):
  batched@L    `onsft.engine.hinted.hinted_decode`: the batch's hinted and plain contexts (2 x `--batch` rows)
               through one copy of the weights with one KV cache
  single@L     the same code with batch_size 1, on the first `--ref-examples` examples: caching, no batching
  reference    the reference algorithm (github.com/zhangmiaosen2000/Towards-On-Policy-SFT,
               HintedDecoding/sampling/hinted_decoding.py), re-implemented faithfully: one example at a time,
               two model copies, no KV cache (both contexts recomputed in full every step), its
               nucleus-then-temperature processor, per-token text decoding for the marker check and a
               repetition scan every 100 tokens; on the same examples as single@L. It is quadratic in the
               length, so it runs two `--ref-segment`-token stretches per example: from the prompt
               (reference_early) and after a prefix of L - segment tokens (reference_late@L); its cost per
               token grows linearly along the sequence, so the mean of the two stretches' per-token times is
               the mean over all L tokens
  hf_generate@L, ours_generate@L   (at the largest L) transformers `model.generate` and onsft's `generate` on
               the plain contexts alone (same batch, model and sampling): the cost of ordinary sampling

The variants take turns in this one process, `--rounds` rounds with the order rotated (benchmarks/rounds.py);
every ratio is computed within a round and reported as the median over rounds with range and IQR. The factor
over the reference is split, at each length L of `--lengths`, into
    caching   = reference / single@L      (same examples, same tokens)
    batching  = single@L / batched@L      (per generated token)
    total     = caching x batching        (batched@L over the reference, per generated token)
single@L's tokens are checked identical to batched@L's for its examples (results do not depend on the
batch size, so both do the same work). Clock: this process's CPU time at one torch thread (default), so other
jobs on a shared machine do not decide the ratios; wall times are in the JSON.

Model: a randomly initialised Llama of a realistic shape for a CPU (hidden 512, 4 layers, 8 heads with 4 KV
heads, MLP 1408, vocabulary 4096: 16M parameters, float32): big enough that matrix products and KV-cache
reads, not Python overhead, dominate a step, as they do for real models; small enough for a 2-core run. Its
head is scaled 10x so next-token distributions are peaked like a trained model's (~2.2 nats), which makes
lambda vary and keeps top-p nuclei small. A random model falls into loops that a trained one would not, so the
repetition detector runs (its cost counts) with a count no loop reaches. Prompts are random token ids shaped
like the rewrite pipeline's: plain = question (48-160 tokens); hinted = a shared 384-token rewriting
instruction + the question + a 128-384-token reference (the reference code's instruction alone is ~700
tokens), so hinted prompts are ~7x longer than plain ones.

`--model NAME` (an alias such as smollm2-135m, a local folder, anything `onsft.runtime.models.load_model`
accepts) runs the same variants on that model, loaded as onsft loads it (float32 on the CPU), with real
text: reasoning-gym questions (chain_sum and gcd in turn, seed 0, with the worked references onsft builds
for them) in the model's chat template as the plain prompts, and the hinted prompts exactly as
`onsft rewrite` builds them for that model (`onsft.pipeline.rewrite.hint_prompts`: the model folder's onsft.json, else its
family's rewrite profile, else the generic rewrite instruction; for SmolLM2 the restate form: the question,
the reference as the model's earlier answer and a follow-up asking to write it again). The answer marker and
beta come from the same place, for hinted decoding and the reference alike; a row that writes the marker
hands over to its plain context (counted in `hinted_stats`). EOS stays suppressed, so every row still makes
exactly L tokens. The reference's `late` stretches start after L - segment token ids drawn at random from
the model's non-special vocabulary (its cost does not depend on which tokens they are).

    python benchmarks/hinted.py [--batch 16 --lengths 64 256 --rounds 5 --out benchmarks/results/hinted.json]
    python benchmarks/hinted.py --model smollm2-135m   # writes benchmarks/results/hinted-smollm2-135m.json
    python benchmarks/hinted.py --quick      # tiny sizes, a few seconds (tests/test_benchmarks.py)
"""

from __future__ import annotations

import argparse
import copy
import itertools
import random
import string
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from onsft.engine.decoding import SamplingConfig, generate
from onsft.engine.hinted import ANSWER_MARKER, DEFAULT_BETA, HintedConfig, answer_markers, hinted_decode
from onsft.runtime.records import write_json_atomic

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rounds  # noqa: E402

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


def model_slug(name: str) -> str:
    """A file-name part for a model name or path: `smollm2-135m`, `model` for .../model/, `x` for x.gguf."""
    path = Path(name)
    return (path.stem if path.suffix == ".gguf" else path.name) or "model"


def real_prompts(name: str, model, tokenizer, n: int) -> tuple[list[list[int]], list[list[int]], dict]:
    """`n` plain and hinted prompts of real text for a loaded model: reasoning-gym chain_sum and gcd questions
    in turn (seed 0) with onsft's worked references, encoded as `onsft rewrite` encodes them for this model.
    Also returns the hint's settings (form, source, answer marker, beta)."""
    from onsft.data.chat import encode_prompt
    from onsft.data.gym import gym_rows
    from onsft.pipeline.rewrite.hint_profiles import model_profile
    from onsft.pipeline.rewrite.hint_prompts import hinted_messages, resolve_hint
    from onsft.runtime.models import read_model_info

    profile = model_profile(name, model.config, tokenizer)
    hint = resolve_hint(None, None, None, False, read_model_info(name), profile)
    tasks = ("chain_sum", "gcd")
    pools = [[r for r in gym_rows(task, 2 * n, seed=0, metadata=False) if r.get("reference")] for task in tasks]
    rows = [pools[i % len(tasks)][i // len(tasks)] for i in range(n)]
    plain, hinted = [], []
    for row in rows:
        prompt = [{"role": "user", "content": row["prompt"]}]
        plain.append(encode_prompt(tokenizer, prompt))
        hinted.append(encode_prompt(tokenizer, hinted_messages(prompt, row["reference"], hint)))
    facts = {
        "tasks": list(tasks),
        "hint_form": hint.form,
        "hint_source": hint.source,
        "answer_marker": hint.answer_marker,
        "beta": hint.beta,
    }
    return plain, hinted, facts


def load(args):
    """(model, tokenizer, plain, hinted, prompt facts): the random model and its random-token prompts, or
    `--model` with real text (see the module doc). Sets args.vocab, args.eos, args.pad, args.marker, args.beta."""
    if args.model is None:
        tokenizer = build_tokenizer(args.vocab)
        model = build_model(args)
        plain, hinted = make_prompts(args, args.batch)
        args.eos, args.pad, args.marker, args.beta = 1, 0, None, None
        return model, tokenizer, plain, hinted, {"source": "random token ids"}
    from onsft.runtime.models import load_model, load_tokenizer

    torch.manual_seed(0)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model).eval()
    plain, hinted, facts = real_prompts(args.model, model, tokenizer, args.batch)
    args.vocab = model.config.vocab_size
    args.eos, args.pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    args.marker, args.beta = facts["answer_marker"], facts["beta"]
    facts["source"] = "reasoning-gym questions with worked references, the model's chat template"
    return model, tokenizer, plain, hinted, facts


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
    markers: tuple[str, ...],
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
        if any(marker in text for marker in markers):
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


def hinted_config(length: int, batch_size: int, args) -> HintedConfig:
    # Reference demo settings: beta 3, temperature 0.3, top-p 0.95, the "\boxed{" marker (random model);
    # with --model, the marker and beta of the model's hint format (args.marker, args.beta).
    return HintedConfig(
        max_new_tokens=length,
        min_new_tokens=length,
        batch_size=batch_size,
        seed=0,
        repetition_count=10**9,
        answer_marker=args.marker,
        beta=args.beta,
    )


def hf_generate(model, prompts: list[list[int]], length: int, pad: int = 0):
    """transformers' `generate` on left-padded prompts, with hinted decoding's sampling settings."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=mask,
            do_sample=True,
            temperature=0.3,
            top_p=0.95,
            top_k=None,
            max_new_tokens=length,
            min_new_tokens=length,
            pad_token_id=pad,
        )
    assert out.shape == (len(prompts), width + length)
    return out[:, width:]


def breakdown(model, tokenizer, plain, hinted, args, clock: str) -> dict:
    """Where hinted decoding's time goes against `generate` on the plain contexts, in turns at the largest L:
    its prefill alone (max_new_tokens 1), and HF `generate` on BOTH contexts (plain and hinted prompts as 2B
    rows: the forward work of hinted decoding without the mixing)."""
    n = max(args.lengths)
    fns = {
        f"batched@{n}": lambda: hinted_decode(model, tokenizer, plain, hinted, hinted_config(n, args.batch, args)),
        "prefill_only": lambda: hinted_decode(model, tokenizer, plain, hinted, hinted_config(1, args.batch, args)),
        f"hf_generate@{n}": lambda: hf_generate(model, plain, n, args.pad),
        f"hf_generate_both@{n}": lambda: hf_generate(model, plain + hinted, n, args.pad),
    }
    times, last = rounds.in_turns(fns, args.rounds)
    return {
        "hinted_stats": hinted_stats(last[f"batched@{n}"]),
        "hinted_vs_hf_generate": rounds.speedup(times, f"batched@{n}", f"hf_generate@{n}", clock),
        # The same rows, prompts and steps: a ratio of times (> 1: hinted decoding is faster).
        "hinted_vs_hf_generate_both_contexts": rounds.speedup(times, f"batched@{n}", f"hf_generate_both@{n}", clock),
        "prefill_share_of_hinted": rounds.paired(times, "prefill_only", f"batched@{n}", clock),
        "times": times,
    }


def variants(model, tokenizer, plain, hinted, args) -> tuple[dict, dict]:
    """{name: a function decoding that variant} and {name: tokens it generates}."""
    k, seg, top = args.ref_examples, args.ref_segment, max(args.lengths)

    def ours_plain(length: int):
        config = SamplingConfig(
            max_new_tokens=length,
            min_new_tokens=length,
            temperature=0.3,
            top_p=0.95,
            batch_size=args.batch,
            repetition_count=10**9,
        )
        return generate(model, tokenizer, plain, config)

    # The reference loads the model twice: separate copies of the weights.
    hinted_copy, plain_copy = copy.deepcopy(model), copy.deepcopy(model)
    markers = answer_markers(ANSWER_MARKER if args.marker is None else args.marker)
    beta = DEFAULT_BETA if args.beta is None else args.beta
    ref = dict(beta=beta, temperature=0.3, top_p=0.95, markers=markers, eos=args.eos, repetition_count=10**9)
    rng = random.Random(1)
    special = set(tokenizer.all_special_ids) if args.model else set(range(5))
    ordinary = [i for i in range(args.vocab) if i not in special]
    prefixes = {length: [rng.choice(ordinary) for _ in range(length - seg)] for length in args.lengths}

    def reference(length: int | None):
        prefix = prefixes[length] if length else None
        return [
            reference_hinted(hinted_copy, plain_copy, tokenizer, hinted[i], plain[i], seg, prefix=prefix, **ref)
            for i in range(k)
        ]

    fns, tokens = {"reference_early": lambda: reference(None)}, {"reference_early": k * seg}
    for length in args.lengths:
        fns[f"batched@{length}"] = lambda n=length: hinted_decode(
            model, tokenizer, plain, hinted, hinted_config(n, args.batch, args)
        )
        fns[f"single@{length}"] = lambda n=length: hinted_decode(
            model, tokenizer, plain[:k], hinted[:k], hinted_config(n, 1, args)
        )
        fns[f"reference_late@{length}"] = lambda n=length: reference(n)
        tokens.update({f"batched@{length}": args.batch * length, f"single@{length}": k * length})
        tokens[f"reference_late@{length}"] = k * seg
    fns[f"hf_generate@{top}"] = lambda: hf_generate(model, plain, top, args.pad)
    fns[f"ours_generate@{top}"] = lambda: ours_plain(top)
    tokens[f"hf_generate@{top}"] = tokens[f"ours_generate@{top}"] = args.batch * top
    return fns, tokens


def factors(times: dict, args, clock: str) -> dict:
    """Per-round ratios (as spreads): the split of the factor over the reference, and vs generate."""
    k, seg, top, b = args.ref_examples, args.ref_segment, max(args.lengths), args.batch
    c = {name: t[clock] for name, t in times.items()}
    out = {}
    for n in args.lengths:
        # The reference's time for k examples x n tokens: the mean per-token time of its two stretches x n.
        ref = [n * (e + late) / (2 * seg) for e, late in zip(c["reference_early"], c[f"reference_late@{n}"])]
        single = c[f"single@{n}"]
        per_token_batched = [t / (b * n) for t in c[f"batched@{n}"]]
        out[f"caching@{n}"] = rounds.spread([r / s for r, s in zip(ref, single)])
        out[f"batching@{n}"] = rounds.spread([s / (k * n) / p for s, p in zip(single, per_token_batched)])
        out[f"total@{n}"] = rounds.spread([r / (k * n) / p for r, p in zip(ref, per_token_batched)])
    # Same batch, same tokens (b x top each): a ratio of times is the inverse ratio of tokens/s.
    out["hinted_vs_hf_generate"] = rounds.speedup(times, f"batched@{top}", f"hf_generate@{top}", clock)
    out["ours_generate_vs_hf_generate"] = rounds.speedup(times, f"ours_generate@{top}", f"hf_generate@{top}", clock)
    out["hinted_vs_ours_generate"] = rounds.speedup(times, f"batched@{top}", f"ours_generate@{top}", clock)
    return out


def hinted_stats(results) -> dict:
    return {
        "handovers": sum(r.handed_over for r in results),
        "mean_lambda": sum(r.mean_lambda for r in results) / len(results),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        default=None,
        help="a model onsft loads (alias, folder, .gguf) with real-text prompts; default: the random Llama "
        "(the shape options below apply to it only)",
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 256], help="new tokens per row (L)")
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
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ref-examples", type=int, default=2, help="examples of single@L and the reference")
    parser.add_argument("--ref-segment", type=int, default=16, help="tokens per timed stretch of the reference")
    parser.add_argument("--threads", type=int, default=1, help="torch threads; 1 = CPU-time clock, else wall")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 2 rounds: checks the script runs")
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="instead: hinted decoding's prefill share and HF generate on both contexts, at the largest L",
    )
    parser.add_argument(
        "--out", default=None, help="default benchmarks/results/hinted[_breakdown][-MODEL].json (MODEL: --model's name)"
    )
    args = parser.parse_args(argv)
    started = rounds.clocks()
    if args.quick:
        args.batch, args.lengths, args.hidden, args.intermediate, args.layers = 4, [8, 16], 64, 128, 2
        args.vocab, args.question_len, args.reference_len, args.instruction_len = 512, [8, 16], [8, 16], 16
        args.rounds, args.ref_examples, args.ref_segment = 2, 1, 4  # (--model: its own vocabulary)
    if min(args.lengths) <= args.ref_segment:
        parser.error("every --lengths value must exceed --ref-segment")
    torch.set_num_threads(args.threads)
    clock = rounds.clock_for(args.threads)
    model, tokenizer, plain, hinted, prompt_facts = load(args)
    loaded = rounds.since(started)
    n_params = sum(p.numel() for p in model.parameters())
    model_name = args.model or "random Llama"
    print(f"{model_name}: {n_params / 1e6:.1f}M parameters, loaded in {loaded['wall']:.1f} s", file=sys.stderr)

    # Warm-up: first calls pay for lazy initialisation (kernels, allocator).
    warm = HintedConfig(max_new_tokens=4, min_new_tokens=4, seed=0, repetition_count=10**9)
    hinted_decode(model, tokenizer, plain[:2], hinted[:2], warm)
    model.generate(torch.tensor([plain[0]]), max_new_tokens=4, do_sample=False, pad_token_id=args.pad)

    slug = f"-{model_slug(args.model)}" if args.model else ""
    default_out = Path(__file__).parent / "results" / f"hinted{'_breakdown' * args.breakdown}{slug}.json"
    args.out = args.out or str(default_out)
    if args.breakdown:
        result = {"model": model_name, "params_millions": round(n_params / 1e6, 2)}
        result.update(breakdown(model, tokenizer, plain, hinted, args, clock))
        result.update(clock=clock, settings=vars(args), machine=rounds.machine())
        result["prompt_mean_tokens"] = {
            "plain": sum(map(len, plain)) / len(plain),
            "hinted": sum(map(len, hinted)) / len(hinted),
        }
        result.update(prompts=prompt_facts, load_seconds=loaded, run_seconds=rounds.since(started))
        print(f"at L = {max(args.lengths)}, batch {args.batch}; clock: {rounds.clock_words(clock, args.threads)}")
        for name in ("hinted_vs_hf_generate", "hinted_vs_hf_generate_both_contexts", "prefill_share_of_hinted"):
            print(f"  {name:<36} {rounds.show(result[name], 2)}")
        write_json_atomic(args.out, result)
        print(f"wrote {args.out}")
        return result
    fns, tokens = variants(model, tokenizer, plain, hinted, args)
    times, last = rounds.in_turns(fns, args.rounds)
    k = args.ref_examples
    same_tokens, counts_ok = {}, True
    for n in args.lengths:
        batched, single = last[f"batched@{n}"], last[f"single@{n}"]
        counts_ok &= all(r.n_tokens == n for r in batched + single)
        same_tokens[n] = [r.token_ids for r in single] == [r.token_ids for r in batched[:k]]
    assert counts_ok, "rows stopped before the token limit"
    ratios = factors(times, args, clock)
    top = max(args.lengths)
    rates = {
        name: rounds.spread([tokens[name] / t for t in times[name][clock]])
        for name in times
        if not name.startswith("reference")
    }
    result = {
        "benchmark": "hinted decoding throughput (generated tokens/s)",
        "model": model_name,
        "clock": clock,
        "clock_words": rounds.clock_words(clock, args.threads),
        "ratios": ratios,
        "tokens_per_s": rates,
        "single_tokens_equal_batched": same_tokens,
        "prompt_mean_tokens": {
            "plain": sum(map(len, plain)) / len(plain),
            "hinted": sum(map(len, hinted)) / len(hinted),
            "plain_reference_examples": sum(map(len, plain[:k])) / k,
            "hinted_reference_examples": sum(map(len, hinted[:k])) / k,
        },
        "tokens_per_call": tokens,
        "times": times,
        "hinted_stats": hinted_stats(last[f"batched@{top}"]),
        "settings": {**vars(args), "params_millions": round(n_params / 1e6, 2)},
        "prompts": prompt_facts,
        "machine": rounds.machine(),
        "load_seconds": loaded,
        "run_seconds": rounds.since(started),
    }
    p = result["prompt_mean_tokens"]
    print(
        f"model {model_name}, {n_params / 1e6:.1f}M params, vocab {args.vocab}; batch {args.batch}; prompts: plain mean "
        f"{p['plain']:.0f}, hinted mean {p['hinted']:.0f} tokens (the {k} examples of single/reference: "
        f"{p['plain_reference_examples']:.0f} / {p['hinted_reference_examples']:.0f}); {args.rounds} rounds in turns; "
        f"clock: {result['clock_words']}"
    )
    for name, r in rates.items():
        print(f"  {name:<22} {r['median']:9.1f} tokens/s [{r['min']:.1f}-{r['max']:.1f}]")
    print("factor over the reference algorithm, per generated token (median of per-round ratios [range] (IQR)):")
    for n in args.lengths:
        print(
            f"  at L = {n} new tokens: caching {rounds.show(ratios[f'caching@{n}'], 1)}; "
            f"batching {rounds.show(ratios[f'batching@{n}'], 2)}; total {rounds.show(ratios[f'total@{n}'], 1)}"
            f"; single tokens == batched: {same_tokens[n]}"
        )
    print(f"at L = {top}, batch {args.batch}, tokens/s ratios:")
    for name in ("hinted_vs_hf_generate", "ours_generate_vs_hf_generate", "hinted_vs_ours_generate"):
        print(f"  {name:<30} {rounds.show(ratios[name], 2)}")
    write_json_atomic(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
