"""Training-step cost of onsft's IDFT against TRL's own SFTTrainer (nll) and a naive full-logit IDFT.

Each variant runs in a fresh subprocess on the same model (Llama built from a config with a real
vocabulary) and the same batch; we report the median forward+backward time over repeats and the peak
memory of the step above the process's memory just before it (ru_maxrss delta), then ratios:

    idft / trl_nll time   (target <= 1.05)     idft / trl_nll memory (target <= 1.02)
    naive / idft memory   (target >= 3 at sequence length 2048)

    python benchmarks/train_step.py --out benchmarks/results/train_step.json

`--alternate` measures what EAFT and ASFT add to a plain nll step of the same trainer: the three trainers
(each on its own copy of one model) take turns on the same batch inside one process, round after round
(the order rotated each round), so drift of the shared machine hits all three alike; each round gives a
paired ratio eaft/nll and asft/nll, reported as the median over rounds with its range. It also times
EAFT's top-K alone, streamed over vocabulary tiles vs from full logits (the cost the tiles avoid):

    python benchmarks/train_step.py --alternate --out benchmarks/results/train_step_losses.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=args.seq,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    labels = ids.clone()
    labels[:, : args.seq // 4] = -100  # a prompt quarter, masked like real SFT data
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return model, batch


def make_step(variant: str, model, args, workdir: str):
    import datasets
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny import tiny_tokenizer  # any tokenizer will do: the batch is pre-tokenised

    tokenizer = tiny_tokenizer()
    dummy = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3]], "labels": [[-100, 2, 3]]})
    common = dict(
        output_dir=workdir,
        bf16=False,
        use_cpu=True,
        report_to="none",
        per_device_train_batch_size=1,
        dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False,
        max_steps=1,
    )
    if variant == "naive_fp32":
        from onsft.formulas.weighting import LossConfig, idft_loss

        config = LossConfig(loss="idft")

        def step(batch):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            logp_all = torch.log_softmax(logits[:, :-1], -1)
            labels = batch["labels"][:, 1:]
            mask = labels != -100
            logp = logp_all.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            entropy = -(logp_all.exp() * logp_all).sum(-1)
            idft_loss(logp, entropy, mask, config).backward()

        return step
    if variant == "trl_nll":
        from trl import SFTConfig, SFTTrainer

        trainer = SFTTrainer(
            model=model,
            args=SFTConfig(loss_type="nll", gradient_checkpointing=False, **common),
            train_dataset=dummy,
            processing_class=tokenizer,
        )
    else:
        from onsft.engine.trainer import OnPolicySFTTrainer, TrainConfig
        from onsft.formulas.weighting import LossConfig

        tiles = {"head_token_chunk": 4096, "head_vocab_chunk": 32768} if variant == "idft_trl_tiles" else {}
        loss = "idft" if variant.startswith("idft") else variant
        trainer = OnPolicySFTTrainer(
            model=model,
            args=TrainConfig(**common, **tiles),
            train_dataset=dummy,
            processing_class=tokenizer,
            loss_config=LossConfig(loss=loss),
        )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by train(); we call training_step directly

    def step(batch):
        trainer.training_step(trainer.model, dict(batch))

    return step


def worker(variant: str, args) -> dict:
    import tempfile

    import torch

    torch.set_num_threads(args.threads)
    model, batch = build(args)
    with tempfile.TemporaryDirectory() as workdir:
        step = make_step(variant, model, args, workdir)
        before = rss_bytes()
        times = []
        for _ in range(args.repeats + 1):
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            step(batch)
            times.append(time.perf_counter() - start)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "variant": variant,
        "step_seconds": statistics.median(times[1:]),
        "all_seconds": times,
        "peak_step_bytes": max(0, peak - before),
    }


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "all": values}


def alternate(args) -> dict:
    """nll, eaft and asft steps in turn in this process (module docstring), then EAFT's top-K alone."""
    import tempfile

    import torch

    from onsft.formulas.tiled_head import HeadTiles, top_k_entropy, top_k_entropy_from_hidden

    torch.set_num_threads(args.threads)
    model, batch = build(args)
    variants = args.loss_variants.split(",")
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as workdir:
        steps = {v: make_step(v, copy.deepcopy(model), args, f"{workdir}/{v}") for v in variants}
        for v in variants:  # warm-up, untimed
            steps[v](batch)
        for r in range(args.rounds):
            for v in variants[r % len(variants) :] + variants[: r % len(variants)]:
                start = time.perf_counter()
                steps[v](batch)
                seconds[v].append(time.perf_counter() - start)
    base = variants[0]
    ratios = {f"{v}_over_{base}": spread([a / b for a, b in zip(seconds[v], seconds[base])]) for v in variants[1:]}
    # EAFT's top-K alone at the response positions of the batch: streamed tiles vs full logits.
    head = model.get_output_embeddings().weight.detach()
    with torch.no_grad():
        hidden = model.model(input_ids=batch["input_ids"]).last_hidden_state[:, :-1]
        hidden = hidden[batch["labels"][:, 1:] != -100]
    ways = {
        "tiles_trainer_cpu_1024x8192": lambda: top_k_entropy_from_hidden(
            hidden, head, 20, None, HeadTiles(1.0, None, 1024, 8192)
        ),
        "tiles_256x2048": lambda: top_k_entropy_from_hidden(hidden, head, 20, None, HeadTiles(1.0, None, 256, 2048)),
        "full_logits": lambda: top_k_entropy((hidden @ head.T).topk(20, dim=-1).values),
    }
    top_k_seconds: dict[str, list[float]] = {w: [] for w in ways}
    with torch.no_grad():
        reference = ways["full_logits"]()
        agreement = {w: float((f() - reference).abs().max()) for w, f in ways.items()}
        for r in range(args.rounds):
            for w in list(ways)[r % len(ways) :] + list(ways)[: r % len(ways)]:
                start = time.perf_counter()
                ways[w]()
                top_k_seconds[w].append(time.perf_counter() - start)
    return {
        "step_seconds": {v: spread(t) for v, t in seconds.items()},
        "paired_ratios": ratios,
        "top_k": {
            "rows": int(hidden.shape[0]),
            "seconds": {w: spread(t) for w, t in top_k_seconds.items()},
            "max_abs_difference_to_full_logits": agreement,
            "full_logits_bytes": int(hidden.shape[0]) * head.shape[0] * 4,
            "tile_bytes_trainer_cpu": 1024 * 8192 * 4,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", default="trl_nll,idft,idft_trl_tiles,naive_fp32")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="benchmarks/results/train_step.json")
    parser.add_argument("--alternate", action="store_true", help="nll vs eaft vs asft in one process, in turns.")
    parser.add_argument("--loss_variants", default="nll,eaft,asft", help="With --alternate; the first is the base.")
    parser.add_argument("--rounds", type=int, default=5, help="With --alternate: timed rounds.")
    args = parser.parse_args()
    if args.alternate:
        result = alternate(args)
        for v, t in result["step_seconds"].items():
            print(f"{v:>6}: {t['median']:.3f} s/step (min {t['min']:.3f}, max {t['max']:.3f})")
        for key, r in result["paired_ratios"].items():
            print(f"{key}: {r['median']:.3f} (rounds: {r['min']:.3f} .. {r['max']:.3f})")
        for w, t in result["top_k"]["seconds"].items():
            print(f"top-K {w}: {t['median']:.3f} s ({result['top_k']['rows']} rows)")
        settings = {k: v for k, v in vars(args).items() if k not in ("worker", "variants", "repeats")}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"settings": settings, **result}, indent=2))
        return
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    results = {}
    passthrough = [a for a in sys.argv[1:] if not a.startswith("--out") and a != args.out]
    for variant in args.variants.split(","):
        out = subprocess.run(
            [sys.executable, __file__, *passthrough, "--worker", variant], capture_output=True, text=True, check=True
        )
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[variant]
        print(f"{variant:>16}: {r['step_seconds']:.3f} s/step, step memory {r['peak_step_bytes'] / 2**20:.0f} MiB")
    ratios = {}
    if "trl_nll" in results and "idft" in results:
        base, ours = results["trl_nll"], results["idft"]
        ratios["idft_over_trl_time"] = ours["step_seconds"] / base["step_seconds"]
        ratios["idft_over_trl_memory"] = ours["peak_step_bytes"] / max(1, base["peak_step_bytes"])
    if "naive_fp32" in results and "idft" in results:
        ratios["naive_over_idft_memory"] = results["naive_fp32"]["peak_step_bytes"] / max(
            1, results["idft"]["peak_step_bytes"]
        )
        ratios["naive_over_idft_time"] = results["naive_fp32"]["step_seconds"] / results["idft"]["step_seconds"]
    targets = {
        "idft_over_trl_time": ("<=", 1.05),
        "idft_over_trl_memory": ("<=", 1.02),
        "naive_over_idft_memory": (">=", 3.0),
    }
    verdict = {}
    for key, value in ratios.items():
        if key in targets:
            op, bound = targets[key]
            verdict[key] = value <= bound if op == "<=" else value >= bound
        print(
            f"{key}: {value:.3f}"
            + (
                f"  (target {targets[key][0]} {targets[key][1]}: {'met' if verdict[key] else 'NOT met'})"
                if key in targets
                else ""
            )
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "settings": {k: v for k, v in vars(args).items() if k != "worker"},
                "results": results,
                "ratios": ratios,
                "targets_met": verdict,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
