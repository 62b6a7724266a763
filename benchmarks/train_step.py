"""Training-step cost of onsft's losses against TRL's own SFTTrainer (`loss_type="nll"`), measured fairly.

Every variant is a trainer on its own copy of one model (a Llama built from a config with a real
vocabulary), stepping (forward + backward, no optimiser) on the same batch. The variants take turns in
this one process, round after round with the order rotated (benchmarks/rounds.py), so every ratio is
paired within a round; each is reported as the median of its per-round ratios with the range and IQR.
Clock: this process's CPU time at one torch thread (default), so other jobs on the machine do not decide
the ratios; wall times are in the JSON.

Variants (name@tiles; tiles are the token x vocabulary tiles of TRL's fused LM head, which TRL reads
from two module constants at call time, `trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE` and
`trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE`, so they are set before each step):
  trl_nll@trl    TRL's SFTTrainer, nll, TRL's default tiles 4096 x 32768
  trl_nll@cpu    the same at 1024 x 8192 (what onsft picks on CPU; any TRL user could set it)
  nll|dft|idft|eaft|asft@cpu   onsft's trainer at 1024 x 8192;  idft@trl  at TRL's tiles
  naive_fp32     IDFT from fp32 full-vocabulary logits (what the reference code does)

Headlines: idft / trl_nll at the SAME tiles (the weighting's cost alone), at both tile choices; the tile
choice itself (trl_nll@cpu vs trl_nll@trl) on its own line. Each variant's loss is recorded: nll@cpu
must equal trl_nll@cpu (same formula, same tiles), and a loss must not depend on the tiles.

Step memory: each variant in a fresh subprocess (MALLOC_MMAP_THRESHOLD_ fixed, so freed tensors go back
to the system): one warm-up step, then the rise of the resident-set high-water mark (VmHWM, reset through
/proc/self/clear_refs) over one more step; parameter gradients exist before it and are not counted.

    python benchmarks/train_step.py [--rounds 5 --seq 2048] [--out benchmarks/results/train_step.json]
    python benchmarks/train_step.py --quick      # tiny sizes, a few seconds (tests/test_benchmarks.py)
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import rounds  # noqa: E402

TILES = {"trl": (4096, 32768), "cpu": (1024, 8192)}
VARIANTS = "trl_nll@trl,trl_nll@cpu,idft@trl,idft@cpu,dft@cpu,nll@cpu,eaft@cpu,asft@cpu,naive_fp32"


def build(args):
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


def set_tiles(variant: str) -> None:
    """The process-wide tiles of TRL's fused head for this variant (read by TRL at call time)."""
    from onsft.engine.trainer import configure_fused_head_tiles

    if "@" in variant:
        configure_fused_head_tiles(*TILES[variant.split("@")[1]], "cpu")


def make_step(variant: str, model, workdir: str):
    """A function running one forward + backward of `variant` on a batch; returns the loss."""
    import datasets

    from onsft.formulas.weighting import LossConfig, idft_loss
    from tiny import tiny_tokenizer  # any tokenizer will do: the batch is pre-tokenised

    name, _, tiles = variant.partition("@")
    if name == "naive_fp32":
        config = LossConfig(loss="idft")

        def naive(batch):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            logp_all = torch.log_softmax(logits[:, :-1], -1)
            labels = batch["labels"][:, 1:]
            mask = labels != -100
            logp = logp_all.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            entropy = -(logp_all.exp() * logp_all).sum(-1)
            loss = idft_loss(logp, entropy, mask, config)
            loss.backward()
            return float(loss.detach())

        return naive
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
        activation_checkpointing=False,
    )
    if name == "trl_nll":
        from trl import SFTConfig, SFTTrainer

        trainer = SFTTrainer(
            model=model,
            args=SFTConfig(loss_type="nll", **common),
            train_dataset=dummy,
            processing_class=tiny_tokenizer(),
        )
    else:
        from onsft.engine.trainer import OnPolicySFTTrainer, TrainConfig

        token_chunk, vocab_chunk = TILES[tiles]
        trainer = OnPolicySFTTrainer(
            model=model,
            args=TrainConfig(**common, head_token_chunk=token_chunk, head_vocab_chunk=vocab_chunk),
            train_dataset=dummy,
            processing_class=tiny_tokenizer(),
            loss_config=LossConfig(loss=name),
        )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by train(); training_step is called directly

    def step(batch):
        return float(trainer.training_step(trainer.model, dict(batch)))

    return step


def step_memory(variant: str, args) -> dict:
    """In a fresh process (see the module docstring): MiB the step adds to the resident set at its peak."""
    torch.set_num_threads(args.threads)
    model, batch = build(args)
    with tempfile.TemporaryDirectory() as workdir:
        step = make_step(variant, model, workdir)
        set_tiles(variant)
        step(batch)  # warm-up: lazy initialisation, and the parameter gradients, which stay allocated
        model.zero_grad(set_to_none=False)
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        before = rounds.status_kb("VmRSS")
        step(batch)
        peak = rounds.status_kb("VmHWM")
    return {"variant": variant, "step_mib": (peak - before) / 1024}


def top_k_alone(model, batch, args) -> dict:
    """EAFT's top-K entropy alone at the batch's response positions: streamed over tiles vs full logits."""
    from onsft.formulas.tiled_head import HeadTiles, top_k_entropy, top_k_entropy_from_hidden

    head = model.get_output_embeddings().weight.detach()
    with torch.no_grad():
        hidden = model.model(input_ids=batch["input_ids"]).last_hidden_state[:, :-1]
        hidden = hidden[batch["labels"][:, 1:] != -100]
    ways = {
        "tiles_1024x8192": lambda: top_k_entropy_from_hidden(hidden, head, 20, None, HeadTiles(1.0, None, 1024, 8192)),
        "full_logits": lambda: top_k_entropy((hidden @ head.T).topk(20, dim=-1).values),
    }
    with torch.no_grad():
        reference = ways["full_logits"]()
        agreement = float((ways["tiles_1024x8192"]() - reference).abs().max())
        times, _ = rounds.in_turns(ways, args.rounds)
    return {
        "rows": int(hidden.shape[0]),
        "seconds": {w: rounds.spread(t[args.clock]) for w, t in times.items()},
        "tiles_over_full_logits": rounds.paired(times, "tiles_1024x8192", "full_logits", args.clock),
        "max_abs_difference_to_full_logits": agreement,
        "full_logits_mib": int(hidden.shape[0]) * head.shape[0] * 4 / 2**20,
        "tile_mib": 1024 * 8192 * 4 / 2**20,
    }


def measure(args) -> dict:
    torch.set_num_threads(args.threads)
    variants = args.variants.split(",")
    model, batch = build(args)
    with tempfile.TemporaryDirectory() as workdir:
        steps = {v: make_step(v, copy.deepcopy(model), f"{workdir}/{i}") for i, v in enumerate(variants)}
        losses = {}
        for v in variants:  # warm-up, untimed; the loss of each variant (constant: no optimiser step)
            set_tiles(v)
            losses[v] = steps[v](batch)
        times, _ = rounds.in_turns({v: lambda v=v: steps[v](batch) for v in variants}, args.rounds, between=set_tiles)
    result = {
        "clock": args.clock,
        "clock_words": rounds.clock_words(args.clock, args.threads),
        "losses": losses,
        "step_seconds": {v: rounds.spread(t[args.clock]) for v, t in times.items()},
        "times": times,
        "ratios": {},
    }
    pairs = {
        "idft@cpu / trl_nll@cpu (same tiles 1024x8192)": ("idft@cpu", "trl_nll@cpu"),
        "idft@trl / trl_nll@trl (same tiles 4096x32768)": ("idft@trl", "trl_nll@trl"),
        "trl_nll@cpu / trl_nll@trl (tile choice alone, TRL's loss)": ("trl_nll@cpu", "trl_nll@trl"),
        "idft@cpu / trl_nll@trl (onsft as shipped vs TRL as shipped)": ("idft@cpu", "trl_nll@trl"),
        "nll@cpu / trl_nll@cpu": ("nll@cpu", "trl_nll@cpu"),
        "dft@cpu / trl_nll@cpu": ("dft@cpu", "trl_nll@cpu"),
        "eaft@cpu / nll@cpu": ("eaft@cpu", "nll@cpu"),
        "asft@cpu / nll@cpu": ("asft@cpu", "nll@cpu"),
        "naive_fp32 / idft@cpu": ("naive_fp32", "idft@cpu"),
    }
    for label, (over, base) in pairs.items():
        if over in times and base in times:
            result["ratios"][label] = rounds.paired(times, over, base, args.clock)
    if "eaft@cpu" in variants:
        result["top_k"] = top_k_alone(model, batch, args)
    return result


def memory(args) -> dict:
    names = [v for v in args.memory_variants.split(",") if v]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"), env.get("PYTHONPATH", "")])
    sizes = [f"--{k}={getattr(args, k)}" for k in ("vocab", "hidden", "layers", "seq", "batch", "threads")]
    out = {}
    for v in names:
        if args.quick:  # in this process (no fresh interpreter to start): checks the code, not the memory
            out[v] = step_memory(v, args)["step_mib"]
            continue
        done = subprocess.run(
            [sys.executable, __file__, *sizes, "--memory_of", v], capture_output=True, text=True, check=True, env=env
        )
        out[v] = json.loads(done.stdout.strip().splitlines()[-1])["step_mib"]
    ratios = {}
    for over, base in (("idft@cpu", "trl_nll@cpu"), ("trl_nll@cpu", "trl_nll@trl"), ("naive_fp32", "idft@cpu")):
        if over in out and base in out:
            ratios[f"{over} / {base}"] = out[over] / out[base]
    return {"step_mib": out, "ratios": ratios}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads; 1 = CPU-time clock, else wall")
    parser.add_argument("--variants", default=VARIANTS)
    parser.add_argument("--memory_variants", default="trl_nll@trl,trl_nll@cpu,idft@trl,idft@cpu,naive_fp32")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 2 rounds: checks the script runs")
    parser.add_argument("--memory_of", default=None, help=argparse.SUPPRESS)  # internal: the child process
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_step.json"))
    args = parser.parse_args(argv)
    if args.memory_of:
        print(json.dumps(step_memory(args.memory_of, args)))
        return {}
    if args.quick:
        args.vocab, args.hidden, args.seq, args.rounds, args.memory_variants = 4096, 64, 256, 2, "idft@cpu"
    args.clock = rounds.clock_for(args.threads)

    from onsft.runtime.records import write_json_atomic

    result = measure(args)
    result["memory"] = memory(args)
    result["settings"] = {k: v for k, v in vars(args).items() if k not in ("memory_of", "out")}
    result["machine"] = rounds.machine()
    print(
        f"Llama vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers, batch {args.batch} x {args.seq} tokens; "
        f"{args.rounds} rounds in turns; clock: {result['clock_words']}"
    )
    for v, t in result["step_seconds"].items():
        print(
            f"  {v:<12} {t['median']:7.3f} s/step [{t['min']:.3f}-{t['max']:.3f}]  loss {result['losses'][v]:.6f}"
            + (f"  step memory {result['memory']['step_mib'][v]:.0f} MiB" if v in result["memory"]["step_mib"] else "")
        )
    print("time ratios (median of per-round ratios [range] (IQR)):")
    for label, r in result["ratios"].items():
        print(f"  {label:<62} {rounds.show(r, 3)}")
    for label, value in result["memory"]["ratios"].items():
        print(f"  memory {label:<55} {value:.2f}x")
    if "top_k" in result:
        t = result["top_k"]
        print(
            f"  EAFT top-K alone ({t['rows']} rows): tiles / full logits {rounds.show(t['tiles_over_full_logits'], 3)}, "
            f"max difference {t['max_abs_difference_to_full_logits']:.1e}"
        )
    write_json_atomic(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
