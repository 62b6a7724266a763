"""The preference baselines' trainers: DPO (TRL's `DPOTrainer`) and SimPO (TRL's `CPOTrainer`, simpo loss).

DPO is the sigmoid loss against a frozen copy of the starting model as the reference (with LoRA the
reference is the model with adapters disabled). SimPO is reference-free:
loss = -log sigmoid(beta * (mean log p(chosen) - mean log p(rejected)) - gamma), with per-token mean
log-probabilities (length-normalised rewards) and a target margin gamma. TRL 1.16 provides it as
`trl.experimental.cpo.CPOTrainer` with loss_type="simpo" and cpo_alpha=0 (no behaviour-cloning term);
`DPOTrainer` has no SimPO loss. Defaults: beta 0.1 for DPO, 2.0 for SimPO (the SimPO paper's range
starts there), gamma 0.5.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import torch
from trl import DPOConfig, DPOTrainer

from onsft.engine.trainer import LEARNING_RATE_HELP, LEARNING_RATES, TrainingDefaults
from onsft.errors import UserError

PREFERENCE_METHODS = ("dpo", "simpo")


@dataclass
class PreferenceTrainConfig(TrainingDefaults, DPOConfig):
    """TRL's DPOConfig (every TrainingArguments field works) with onsft's training defaults, plus SimPO's
    margin."""

    output_dir: str | None = field(default="runs/preference", metadata={"help": "Checkpoints and the model go here."})
    learning_rate: float = field(default=LEARNING_RATES["dpo"], metadata={"help": LEARNING_RATE_HELP})
    beta: float | None = field(
        default=None,
        metadata={
            "help": "DPO: strength of the pull to the reference (default 0.1). SimPO: reward scale (default 2.0)."
        },
    )
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO target reward margin gamma."})


def simpo_config(args: PreferenceTrainConfig):
    """The parsed DPO-style config as TRL's CPOConfig for SimPO (loss_type simpo, no BC term)."""
    from trl.experimental.cpo import CPOConfig

    def default(f: dataclasses.Field):
        return f.default_factory() if f.default is dataclasses.MISSING else f.default

    cpo_fields = {f.name for f in dataclasses.fields(CPOConfig) if f.init}
    # Options SimPO has no use for (reference model, DPO loss variants) must not be silently ignored;
    # pad_to_multiple_of and truncation_mode are rewritten by DPOConfig itself, so they are not compared.
    unused = [
        f.name
        for f in dataclasses.fields(DPOConfig)
        if f.init
        and f.name not in cpo_fields
        and f.name not in ("pad_to_multiple_of", "truncation_mode")
        and getattr(args, f.name) != default(f)
    ]
    if list(args.loss_type) != ["sigmoid"]:
        unused.append("loss_type")
    if unused:
        raise UserError(
            f"option(s) {', '.join('--' + n for n in unused)} do not apply to SimPO",
            where="command line",
            fix="drop them, or use --method dpo.",
        )
    values = {name: getattr(args, name) for name in cpo_fields if hasattr(args, name)}
    values.update(
        loss_type="simpo", cpo_alpha=0.0, simpo_gamma=args.simpo_gamma, beta=2.0 if args.beta is None else args.beta
    )
    return CPOConfig(**values)


def trainer_args(method: str, args: PreferenceTrainConfig):
    """The TRL config the method's trainer takes: DPOConfig (beta default 0.1) or CPOConfig for SimPO."""
    if method not in PREFERENCE_METHODS:
        raise UserError(
            f"method `{method}` is not a preference method",
            where="command line",
            fix=f"use --method {' or '.join(PREFERENCE_METHODS)}.",
        )
    if args.beta is not None and args.beta <= 0:
        raise UserError("beta must be > 0", where="command line", fix="pass a positive --beta.")
    if method == "simpo":
        return simpo_config(args)
    args.beta = 0.1 if args.beta is None else args.beta
    return args


def build_preference_trainer(method: str, model, config, peft_config, **common):
    """DPOTrainer against a frozen copy of the starting model, or CPOTrainer (SimPO), reference-free."""
    if method == "dpo":
        # The reference is the starting model, frozen. A copy also works for models built in memory (TRL
        # would reload one from the hub path in the config). With LoRA, disabling adapters gives it for free.
        reference = None if peft_config is not None else copy.deepcopy(model).eval().requires_grad_(False)
        return DPOTrainer(model=model, ref_model=reference, args=config, peft_config=peft_config, **common)
    return simpo_trainer_class()(model=model, args=config, peft_config=peft_config, **common)


def simpo_trainer_class() -> type:
    """TRL's CPOTrainer (an experimental module: imported only for SimPO), counting the tokens it trains on."""
    from trl.experimental.cpo import CPOTrainer

    class SimPOTrainer(CPOTrainer):
        """CPOTrainer whose `num_input_tokens_seen` counts the chosen and rejected sequences (prompt included), as
        DPO's count does: the base Trainer looks for `input_ids`, which CPO's batches lack, and counted nothing,
        so compute-matched readings had no tokens for SimPO."""

        def _track_num_input_tokens(self, inputs):
            masks = [inputs[k] for k in ("chosen_attention_mask", "rejected_attention_mask") if k in inputs]
            mode = self.args.include_num_input_tokens_seen
            if mode == "no" or not masks:
                return super()._track_num_input_tokens(inputs)
            count = sum(int(m.sum()) if mode == "non_padding" else m.numel() for m in masks)
            seen = self.accelerator.gather(torch.tensor(count, device=self.args.device, dtype=torch.int64))
            self.state.num_input_tokens_seen += seen.sum().item()

    return SimPOTrainer
