"""`OnPolicySFTTrainer`: TRL's SFTTrainer with one token weighting (SFT, DFT, IDFT, EAFT and ASFT are its cases).

TRL's fused LM head already returns, per token, log p(y_t) (with gradient) and the entropy H(p_t)
without materialising (batch, length, vocabulary) logits; SFT, DFT and IDFT need exactly those two numbers,
so the main thing this subclass changes is how they are turned into a loss (`onsft.formulas.weighting`).
EAFT also needs the top-K entropy and ASFT the KL from the frozen starting model; both are computed from the
backbone's hidden states in vocabulary tiles (`onsft.engine.token_terms`). Everything else (data
collation, accumulation, accelerate / DDP / FSDP / DeepSpeed, checkpoints, resume) is TRL's and transformers'.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
from transformers import TrainerState
from trl import SFTConfig, SFTTrainer

from onsft.engine.token_terms import (
    StartingModel,
    causal_lm,
    head_tiles,
    last_hidden_states,
    response_rows,
    top_k_entropy,
)
from onsft.errors import UserError
from onsft.formulas.weighting import LossConfig, idft_loss, schedule_lambda, weighting_stats
from onsft.runtime.device import resolve_precision

# TRL's defaults differ by method, and `onsft train --help` shows the sft one: the help names both.
LEARNING_RATES = {"sft": 2e-5, "dpo": 1e-6, "simpo": 1e-6}
LEARNING_RATE_HELP = (
    "The initial learning rate for AdamW. Its default depends on --method: 2e-05 for sft (any --loss), 1e-06 for "
    "dpo and simpo (TRL's defaults for each)."
)


@dataclass
class TrainingDefaults:
    """Defaults of onsft's trainer configs (SFT here, DPO / SimPO in `onsft.engine.preference`), declared
    once and mixed in before TRL's config class, so they override its defaults. Changed defaults say why."""

    # Recomputing activations costs ~20-30% time; small models and CPUs rarely need the memory.
    activation_checkpointing: bool | None = field(
        default=False, metadata={"help": "Trade compute for activation memory."}
    )
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Deprecated alias of activation_checkpointing."}
    )
    save_strategy: str = field(default="steps", metadata={"help": "When to checkpoint (resumable): steps|epoch|no."})
    save_steps: float = field(default=50, metadata={"help": "Checkpoint every N optimiser steps."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep only the last N checkpoints."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N optimiser steps."})
    report_to: None | str | list[str] = field(default="none", metadata={"help": "Experiment trackers (wandb, ...)."})
    include_num_input_tokens_seen: str = field(
        default="non_padding",
        metadata={"help": "Count tokens processed (no | all | non_padding); shown in logs and train_summary.json."},
    )
    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "bf16 mixed precision. Default: on where a GPU supports it, off on CPU (pass --bf16 "
            "true on CPU for ~2x speed on small models, at some numeric cost)."
        },
    )
    disable_tqdm: bool | None = field(
        default=False, metadata={"help": "Hide the training progress bar (steps, rate, ETA; on stderr)."}
    )
    # `ModelArguments` (composed with these configs in `onsft train`) owns --trust_remote_code; TRL's field
    # of the same name is not an option of its own (two would clash in one parser) and is copied from it.
    trust_remote_code: bool = field(
        default=False, init=False, metadata={"help": "Set from ModelArguments.trust_remote_code."}
    )

    def __post_init__(self):
        resolve_precision(self)
        super().__post_init__()
        check_training_values(self)


def check_training_values(args) -> None:
    """Refuse values that TrainingArguments accepts but torch, the data loader or the trainer reject only
    after the data and the model are loaded (with a traceback), or that make a run train nothing. Raises
    ValueError, which the settings parser reports as one line naming the option's source."""

    def need(ok: bool, name: str, why: str, example: str) -> None:
        value = getattr(args, name)
        if isinstance(value, float) and not math.isfinite(value):
            return  # named as non-finite by the settings parser (onsft.runtime.settings.check_finite)
        if not ok:
            raise ValueError(f"`{name}` {why}, got {getattr(args, name)} (pass e.g. --{name} {example})")

    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        need(getattr(args, name) >= 1, name, "must be at least 1", "8" if "batch" in name else "1")
    if args.max_steps <= 0:
        need(
            args.num_train_epochs > 0,
            "num_train_epochs",
            "must be > 0 unless --max_steps is set (nothing would train)",
            "1",
        )
    for name in ("weight_decay", "adam_epsilon", "max_grad_norm", "warmup_steps"):
        need(
            getattr(args, name) >= 0,
            name,
            "must be >= 0",
            "1e-8" if name == "adam_epsilon" else "0",
        )
    for name in ("adam_beta1", "adam_beta2"):
        need(0 <= getattr(args, name) < 1, name, "must be in [0, 1)", "0.9" if name == "adam_beta1" else "0.999")
    need(0 <= args.label_smoothing_factor < 1, "label_smoothing_factor", "must be in [0, 1)", "0")
    need(args.dataloader_num_workers >= 0, "dataloader_num_workers", "must be >= 0", "0")
    for name in ("seed", "data_seed"):
        if getattr(args, name) is not None:
            need(0 <= getattr(args, name) < 2**32, name, "must be in [0, 2**32)", "42")
    if str(getattr(args.save_strategy, "value", args.save_strategy)) == "steps":
        need(args.save_steps > 0, "save_steps", "must be > 0 (or pass --save_strategy no)", "50")
    if getattr(args, "max_length", None) is not None:
        need(args.max_length >= 1, "max_length", "must be at least 1", "1024")


@dataclass
class TrainConfig(TrainingDefaults, SFTConfig):
    """TRL's SFTConfig (every TrainingArguments field works: --learning_rate, --max_steps, ...) with
    onsft's defaults, the fused LM head's tiles, and what to do on a non-finite loss."""

    output_dir: str | None = field(default="runs/train", metadata={"help": "Where checkpoints and the model go."})
    learning_rate: float = field(default=LEARNING_RATES["sft"], metadata={"help": LEARNING_RATE_HELP})
    head_token_chunk: int = field(
        default=0,
        metadata={
            "help": "Tokens per tile of TRL's fused LM head (and of EAFT's top-K / ASFT's KL tiles); 0 = automatic "
            "(TRL's 4096 with Triton, 1024 on CPU, where its torch fallback makes several tile-sized float32 "
            "temporaries)."
        },
    )
    head_vocab_chunk: int = field(
        default=0,
        metadata={
            "help": "Vocabulary columns per tile of the fused LM head (and of EAFT's / ASFT's tiles); 0 = "
            "automatic (TRL's 32768 with Triton, 8192 on CPU)."
        },
    )
    nonfinite: str = field(
        default="stop",
        metadata={
            "help": "On a NaN/inf loss: `stop` with a clear message (exit 2) or `skip` the micro-batch "
            "(counted in the summary)."
        },
    )


def configure_fused_head_tiles(token_chunk: int, vocab_chunk: int, device_type: str) -> tuple[int, int]:
    """Set the tile shape of TRL's fused LM head (process-wide module constants, read at call time).

    On CUDA the Triton kernel folds each tile in place, so TRL's large tiles are right. On CPU the torch
    fallback materialises ~5 float32 copies of a tile; TRL's 4096 x 32768 tile then costs ~2 GB, more than
    the full logits of a 2k-token sequence. Smaller tiles keep the memory advantage at the same speed
    (see benchmarks/train_step.py).
    """
    import trl.kernels.chunked_logprob as kernel
    import trl.trainer.utils as trl_utils

    on_triton = device_type in ("cuda", "xpu")
    token_chunk = token_chunk or (4096 if on_triton else 1024)
    vocab_chunk = vocab_chunk or (32768 if on_triton else 8192)
    if hasattr(kernel, "TOKEN_CHUNK_SIZE") and hasattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE"):
        kernel.TOKEN_CHUNK_SIZE = token_chunk
        trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = vocab_chunk
    return token_chunk, vocab_chunk


class OnPolicySFTTrainer(SFTTrainer):
    """SFTTrainer whose loss is `onsft.formulas.weighting.idft_loss` (nll, dft, idft, eaft or asft by
    `loss_config.loss`)."""

    def __init__(self, *args, loss_config: LossConfig | None = None, **kwargs):
        self.loss_config = loss_config or LossConfig()
        self.loss_config.validate()
        self.skipped_nonfinite = 0
        super().__init__(*args, **kwargs)
        # EAFT's / ASFT's tiles are the fused head's; (0, 0) = `ddt.default_chunks` when TRL's are left alone.
        self.head_chunks = (0, 0)
        if isinstance(self.args, TrainConfig):
            self.head_chunks = configure_fused_head_tiles(
                self.args.head_token_chunk, self.args.head_vocab_chunk, self.accelerator.device.type
            )
        if self.loss_config.loss == "eaft":
            self._check_top_k(causal_lm(self.model, self.accelerator).get_output_embeddings().weight.shape[0])
        # Taken now, before any step: the model as it starts (a resumed run loads its checkpoint later).
        self.starting_model = StartingModel(self.model, self.accelerator) if self.loss_config.loss == "asft" else None

    def _check_top_k(self, vocab: int) -> None:
        if self.loss_config.eaft_top_k > vocab:
            raise UserError(
                f"eaft_top_k={self.loss_config.eaft_top_k} exceeds the vocabulary ({vocab} tokens)",
                where="config",
                fix="pass a smaller --eaft_top_k.",
            )

    def _get_train_sampler(self, *args, **kwargs):
        # A planned order (replay's mixed batches, `onsft.data.replay`) is read as it is, also on transformers
        # versions without a "sequential" train_sampling_strategy of their own.
        if getattr(self.args, "train_sampling_strategy", None) == "sequential":
            dataset = args[0] if args and args[0] is not None else kwargs.get("train_dataset") or self.train_dataset
            return torch.utils.data.SequentialSampler(dataset)
        return super()._get_train_sampler(*args, **kwargs)

    def current_lambda(self) -> float:
        return schedule_lambda(
            self.state.global_step, self.state.max_steps, self.loss_config.schedule_start, self.loss_config.schedule_end
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        inputs["use_cache"] = False
        # Validation reports the plain NLL: a weighted loss is not comparable across methods or steps.
        config = self.loss_config if mode == "train" else LossConfig(loss="nll")
        extra = config.loss in ("eaft", "asft")
        lm = causal_lm(model, self.accelerator)
        with last_hidden_states(lm) if extra else contextlib.nullcontext() as kept:
            outputs = model(**inputs, fused_lm_head=True)
        mask = outputs.label_mask
        terms = {}
        if extra:
            hidden = response_rows(kept["hidden"], mask, inputs)
            tiles = head_tiles(lm, *self.head_chunks)
            if config.loss == "eaft":
                terms["top_k_entropy"] = top_k_entropy(lm, hidden, mask, config.eaft_top_k, tiles)
            else:
                terms["kl"] = self.starting_model.kl(model, hidden, mask, inputs, tiles)
        lam = self.current_lambda() if mode == "train" else 1.0
        num_tokens = mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = idft_loss(outputs.log_probs, outputs.entropy, mask, config, lam, num_tokens, **terms)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts every rank's tokens while DDP averages gradients over ranks.
            loss = loss * self.accelerator.num_processes
        self._record_metrics(mode, outputs, mask, lam, terms)
        if not torch.isfinite(loss):
            loss = self._on_nonfinite(loss)
        return (loss, outputs) if return_outputs else loss

    def _on_nonfinite(self, loss: torch.Tensor) -> torch.Tensor:
        if self.args.nonfinite == "skip":
            self.skipped_nonfinite += 1
            # A fresh leaf: backward gives no parameter any gradient from this micro-batch.
            return torch.zeros((), device=loss.device, requires_grad=True)
        raise UserError(
            f"non-finite loss ({loss.item()}) at step {self.state.global_step}",
            where=self.args.output_dir,
            fix="lower --learning_rate, train in fp32 (--bf16 false), or pass --nonfinite skip; the last "
            "checkpoint in the output folder resumes the run.",
        )

    def _record_metrics(self, mode, outputs, mask, lam, terms) -> None:
        # Validation computes no EAFT / ASFT terms; their weights are then shown as plain NLL's.
        needs_terms = self.loss_config.loss in ("eaft", "asft")
        config = LossConfig(loss="nll") if needs_terms and not terms else self.loss_config
        stats = weighting_stats(outputs.log_probs, outputs.entropy, mask, config, lam, **terms)
        stats["top1"] = (outputs.is_top1 & mask).sum().float() if outputs.is_top1 is not None else None
        stats["entropy"] = (outputs.entropy.detach() * mask).sum()
        names = {
            "nll": "nll",
            "weighted": "weighted_loss",
            "phi": "mean_phi",
            "gamma": "mean_gamma",
            "weight": "mean_weight",
            "at_gamma_min": "frac_gamma_min",
            "at_gamma_max": "frac_gamma_max",
            "top1": "mean_token_accuracy",
            "entropy": "entropy",
            "top_k_entropy": "mean_top_k_entropy",
            "kl": "mean_kl_to_start",
        }
        sums = torch.stack([stats["count"]] + [stats[k].float() for k in names if stats.get(k) is not None])
        sums = self.accelerator.gather_for_metrics(sums.unsqueeze(0)).sum(0)
        count = sums[0].item()
        keys = [k for k in names if stats.get(k) is not None]
        for key, total in zip(keys, sums[1:].tolist()):
            if count > 0:
                self._metrics[mode][names[key]].append(total / count)
        if mode == "train":
            if not needs_terms:  # EAFT's and ASFT's weights have no IDFT schedule: its lambda would mislead
                self._metrics[mode]["idft_lambda"].append(lam)
            self._metrics[mode]["skipped_nonfinite"] = [self.skipped_nonfinite]


def restore_finished(trainer, checkpoint: str) -> float:
    """Load a checkpoint that already holds every planned step into `trainer` (weights and state) without
    training; returns this call's training loss, which is none: 0.0 over 0 steps."""
    trainer._load_from_checkpoint(checkpoint)
    trainer.state = TrainerState.load_from_json(f"{checkpoint}/trainer_state.json")
    return 0.0
