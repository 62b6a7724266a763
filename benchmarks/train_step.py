"""Training-step cost of onsft's IDFT against TRL's own SFTTrainer (nll) and a naive full-logit IDFT.

Each variant runs in a fresh subprocess on the same model (Llama built from a config with a real
vocabulary) and the same batch; we report the median forward+backward time over repeats and the peak
memory of the step above the process's memory just before it (ru_maxrss delta), then ratios:

    idft / trl_nll time   (target <= 1.05)     idft / trl_nll memory (target <= 1.02)
    naive / idft memory   (target >= 3 at sequence length 2048)

    python benchmarks/train_step.py --out benchmarks/results/train_step.json
"""

from __future__ import annotations

import argparse
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

        tiles = {"idft": {}, "idft_trl_tiles": {"head_token_chunk": 4096, "head_vocab_chunk": 32768}}[variant]
        trainer = OnPolicySFTTrainer(
            model=model,
            args=TrainConfig(**common, **tiles),
            train_dataset=dummy,
            processing_class=tokenizer,
            loss_config=LossConfig(loss="idft"),
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
    args = parser.parse_args()
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
