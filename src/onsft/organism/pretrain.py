"""Pretrain the model organism from scratch, seeded, on CPU in a few minutes; then measure it.

    python -m onsft.organism.pretrain --out src/onsft/organism/model [--seed 0 --steps 1200]

The run is a fixed number of steps (not a time budget) so the same seed gives the same data and the
same updates; bit-identical weights additionally need the same torch build and thread count.
Training uses bf16 autocast (about 2x faster than fp32 on these CPUs) with fp32 master weights.
The checkpoint stores fp32 weights (~13 MB). Storing bf16 would halve that, but transformers then
loads bf16 parameters whenever a caller passes `dtype=None`, and fine-tuning at lr 2e-4 needs fp32
weights (updates that small vanish when rounded to bf16). Reported numbers are measured on the
saved checkpoint, loaded back.

Measured for the shipped checkpoint (seed 0, 1200 steps, batch 64, one thread, 3.1M tokens): 611 CPU
seconds, 687 s wall on the shared 2-core machine (4.5k tokens/s); held-out greedy accuracy on the old
skills 97%, hinted context alone 91% correct and native on old skills, new skill 0%. Copy and reverse
are learned last: at 800 steps they were still at ~60%. Two runs with the same settings on this machine
gave bit-identical weights.

The output folder holds config.json, model.safetensors, generation_config.json, the tokenizer (with
its chat template) and onsft.json: the hint template and answer marker the rewrite command must use,
the pretraining settings, and the measured accuracies.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from onsft.errors import EXIT_USER_ERROR, UserError
from onsft.organism import tasks
from onsft.organism.tokenizer import build_tokenizer
from onsft.runtime.records import atomic_directory, write_json_atomic
from onsft.runtime.settings import parse_command


@dataclass
class PretrainConfig:
    out: str = field(default="src/onsft/organism/model", metadata={"help": "output model folder (replaced atomically)"})
    seed: int = field(default=0, metadata={"help": "seed of the data stream and the initialisation"})
    steps: int = field(default=1200, metadata={"help": "optimiser steps"})
    batch_size: int = field(default=64, metadata={"help": "sequences per step"})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate (AdamW)"})
    warmup_steps: int = field(
        default=100, metadata={"help": "linear warm-up steps, then cosine decay to a tenth of the peak"}
    )
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (matrices only)"})
    hidden_size: int = field(default=256, metadata={"help": "model width"})
    layers: int = field(default=4, metadata={"help": "transformer layers"})
    heads: int = field(default=4, metadata={"help": "attention heads"})
    intermediate_size: int = field(default=688, metadata={"help": "MLP width"})
    bf16: bool = field(default=True, metadata={"help": "bf16 autocast for the forward/backward pass"})
    # One thread by default: on a shared 2-core machine two threads ran ~6x slower per step than one
    # (3.3 vs 0.58 s) whenever another process was busy, and a fixed count keeps runs reproducible.
    threads: int = field(default=1, metadata={"help": "torch CPU threads (0: torch's default)"})
    log_every: int = field(default=50, metadata={"help": "steps between progress lines"})
    eval_size: int = field(default=400, metadata={"help": "held-out prompts per measurement"})
    measure_only: bool = field(
        default=False, metadata={"help": "skip training: re-measure the checkpoint in --out and update its onsft.json"}
    )


RUN_KEYS = ("wall_seconds", "cpu_seconds", "tokens", "tokens_per_second")


# ---------------------------------------------------------------- model and batches


def build_model(cfg: PretrainConfig, tokenizer: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    torch.manual_seed(cfg.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config)


def encode_pairs(tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]]) -> list[tuple[list[int], int]]:
    """(ids of '<user>P<assistant>R<eos>', prompt length) per pair: the chat template's tokenisation,
    done in two batched calls (the template only inserts special tokens, which split the text)."""
    user, assistant, eos = (tokenizer.convert_tokens_to_ids(t) for t in ("<user>", "<assistant>", "<eos>"))
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
    responses = tokenizer([r for _, r in pairs], add_special_tokens=False)["input_ids"]
    return [([user, *p, assistant, *r, eos], len(p) + 2) for p, r in zip(prompts, responses)]


def collate(encoded: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (ids, prompt_len) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
        labels[row, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])  # response and <eos> only
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def batches(tokenizer: PreTrainedTokenizerBase, cfg: PretrainConfig, pool: int = 8):
    """Endless seeded batches. Draw `pool` batches' worth of examples, sort by length and cut, so a
    batch pads little (plain prompts are ~25 tokens, hinted ones up to ~120), then shuffle the order."""
    rng = random.Random(f"{cfg.seed}:pretrain")
    while True:
        pairs = [tasks.pretraining_example(rng)[:2] for _ in range(cfg.batch_size * pool)]
        encoded = sorted(encode_pairs(tokenizer, pairs), key=lambda e: len(e[0]))
        chunks = [encoded[i : i + cfg.batch_size] for i in range(0, len(encoded), cfg.batch_size)]
        rng.shuffle(chunks)
        for chunk in chunks:
            yield collate(chunk, tokenizer.pad_token_id)


def lr_at(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train(
    cfg: PretrainConfig, tokenizer: PreTrainedTokenizerBase, log=print, on_log=None
) -> tuple[LlamaForCausalLM, dict]:
    """Train from scratch; `on_log(step, model)` (optional) runs after each progress line."""
    model = build_model(cfg, tokenizer)
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    stream = batches(tokenizer, cfg)
    start, cpu_start, tokens, window_loss = time.perf_counter(), time.process_time(), 0, []
    for step in range(cfg.steps):
        batch = next(stream)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
        window_loss.append(loss.item())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            elapsed = time.perf_counter() - start
            log(
                f"step {step + 1}/{cfg.steps} loss {sum(window_loss) / len(window_loss):.4f} "
                f"lr {lr_at(step, cfg):.2e} {tokens / elapsed:.0f} tok/s elapsed {elapsed:.0f}s "
                f"eta {elapsed / (step + 1) * (cfg.steps - step - 1):.0f}s"
            )
            window_loss = []
            if on_log is not None:
                model.eval()
                on_log(step + 1, model)
                model.train()
    model.eval()
    wall = time.perf_counter() - start
    # CPU seconds alongside wall seconds: on a shared machine the wall time says more about the neighbours.
    return model, {
        "wall_seconds": round(wall, 1),
        "cpu_seconds": round(time.process_time() - cpu_start, 1),
        "tokens": tokens,
        "tokens_per_second": round(tokens / wall),
    }


# ---------------------------------------------------------------- measurement


@torch.no_grad()
def greedy_generate(
    model, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int = 48, batch_size: int = 128
) -> list[str]:
    """Greedy responses to user messages, decoded without special tokens; batched, left-padded."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out = []
    try:
        for i in range(0, len(prompts), batch_size):
            texts = [
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
                )
                for p in prompts[i : i + batch_size]
            ]
            enc = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
            gen = model.generate(
                **enc,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            out += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return out


def accuracy_by_task(rows: list[dict], responses: list[str], native: bool = False) -> dict[str, float]:
    """Share of rows answered correctly (and, with `native`, in the organism's own style), per task and overall."""
    hits, counts = defaultdict(int), defaultdict(int)
    for row, response in zip(rows, responses):
        ok = tasks.is_correct(response, row["answer"]) and (not native or tasks.is_native_style(response))
        for key in (row.get("task", "all"), "all"):
            hits[key] += ok
            counts[key] += 1
    return {key: round(hits[key] / counts[key], 4) for key in counts}


@torch.no_grad()
def mean_phi(model, tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]]) -> float:
    """Mean centred log-likelihood (log p + H) over response tokens, plain context; used here only to
    check that the teacher styles span a range of off-policy-ness (onsft.formulas.ddt is the real audit)."""
    total, count = 0.0, 0
    for i in range(0, len(pairs), 64):
        batch = collate(encode_pairs(tokenizer, pairs[i : i + 64]), tokenizer.pad_token_id)
        logp = torch.log_softmax(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].double(), dim=-1
        )
        target = batch["labels"][:, 1:]
        keep = target != -100
        chosen = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        entropy = -(logp.exp() * logp).sum(-1)
        total += float(((chosen + entropy) * keep).sum())
        count += int(keep.sum())
    return total / count


def measure(model, tokenizer: PreTrainedTokenizerBase, n: int = 400, seed: int = 0) -> dict:
    """Held-out accuracies: old skills (plain), hinted context alone (old skills, opaque verbs, and the
    new skill per teacher style), the new skill before tuning, and mean phi per teacher style."""
    metrics: dict = {}
    rows = tasks.retention_test(n, seed)
    metrics["old_skills_plain"] = accuracy_by_task(rows, greedy_generate(model, tokenizer, [r["prompt"] for r in rows]))
    rows = tasks.hinted_old_test(n, seed)
    responses = greedy_generate(model, tokenizer, [r["prompt"] for r in rows])
    metrics["hinted_correct_native"] = accuracy_by_task(rows, responses, native=True)
    old = [(r, x) for r, x in zip(rows, responses) if r["task"] in tasks.OLD_TASKS]
    metrics["hinted_correct_native"]["old_skills"] = accuracy_by_task(*zip(*old), native=True)["all"]
    # Style alone (right or wrong answer): does the foreign wording of the reference leak into the output?
    metrics["hinted_native_style"] = round(sum(map(tasks.is_native_style, responses)) / len(rows), 4)
    rows = tasks.new_skill_test(n // 2, seed) + tasks.new_skill_ood(n // 2, seed)
    responses = greedy_generate(model, tokenizer, [r["prompt"] for r in rows])
    for r in rows:
        r["task"] = "ood_" + r["shift"] if "shift" in r else "in_domain"
    metrics["new_skill_plain"] = accuracy_by_task(rows, responses)
    metrics["new_skill_plain_native_style"] = round(sum(map(tasks.is_native_style, responses)) / len(rows), 4)
    train = tasks.new_skill_train(n // 4, seed)
    hinted, phi = {}, {}
    for style in tasks.STYLE_NAMES:
        sub = [r for r in train if r["style"] == style]
        prompts = [tasks.hinted_prompt(r["prompt"], r["reference"]) for r in sub]
        hinted[style] = accuracy_by_task(sub, greedy_generate(model, tokenizer, prompts), native=True)["all"]
        phi[style] = round(mean_phi(model, tokenizer, [(r["prompt"], r["completion"]) for r in sub]), 3)
    metrics["new_skill_hinted_correct_native"] = hinted
    metrics["new_skill_teacher_mean_phi"] = phi
    return metrics


# ---------------------------------------------------------------- saving


def save(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, out: Path, info: dict) -> None:
    model.generation_config.do_sample = False
    model.generation_config.max_new_tokens = 64
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = None
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp, save_jinja_files=False)  # template inside tokenizer_config.json
        write_json_atomic(tmp / "onsft.json", info)


def organism_info(cfg: PretrainConfig, params: int) -> dict:
    return {
        "hint_template": tasks.HINT_TEMPLATE,
        "hint_system": "",  # the organism learned the hinted context as one user turn, no system turn
        "answer_marker": tasks.ANSWER_MARKER,
        "old_tasks": list(tasks.OLD_TASKS),
        "new_task": tasks.NEW_TASK,
        "teacher_styles": dict(tasks.TEACHER_STYLES),
        "parameters": params,
        "pretraining": dataclasses.asdict(cfg),
    }


def main(argv: list[str] | None = None) -> int:

    try:
        (cfg,) = parse_command(
            argv if argv is not None else sys.argv[1:], PretrainConfig, prog="python -m onsft.organism.pretrain"
        )
    except UserError as error:
        print(error, file=sys.stderr)
        return EXIT_USER_ERROR
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    if cfg.measure_only:
        # Re-measure a saved checkpoint (e.g. after the task definitions gained a teacher style),
        # keeping the pretraining settings and training figures already recorded.
        try:
            info = json.loads((out / "onsft.json").read_text())
        except (OSError, ValueError) as error:
            print(
                UserError(
                    f"no readable onsft.json ({error})",
                    where=str(out),
                    fix="pretrain first, or point --out at a pretrained organism.",
                ),
                file=sys.stderr,
            )
            return EXIT_USER_ERROR
        run = {k: v for k, v in info.get("measured", {}).items() if k in RUN_KEYS}
        info.update({k: v for k, v in organism_info(cfg, info.get("parameters", 0)).items() if k != "pretraining"})
    else:
        tokenizer = build_tokenizer()
        model, run = train(cfg, tokenizer, log=lambda line: print(line, file=sys.stderr, flush=True))
        info = organism_info(cfg, sum(p.numel() for p in model.parameters()))
        save(model, tokenizer, out, info)
    # Measure the checkpoint as shipped (loaded back from disk), not the in-memory model.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    shipped = AutoModelForCausalLM.from_pretrained(out)
    metrics = measure(shipped, AutoTokenizer.from_pretrained(out), cfg.eval_size, seed=cfg.seed)
    info["measured"] = {
        **run,
        "eval_seconds": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        **metrics,
    }
    write_json_atomic(out / "onsft.json", info)
    print(json.dumps(info["measured"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
