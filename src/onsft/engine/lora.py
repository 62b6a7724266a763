"""LoRA settings and their peft config: the one place `onsft train` (SFT, DPO, SimPO) builds adapters."""

from __future__ import annotations

from dataclasses import dataclass, field

from onsft.errors import UserError


@dataclass
class LoraArguments:
    """Low-rank adapters (peft). Rank 0 trains every weight."""

    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 trains all weights."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (the adapters' scale is alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout, in [0, 1)."})
    lora_target_modules: str = field(
        default="all-linear", metadata={"help": "LoRA targets: all-linear or comma-separated module names."}
    )

    def validate(self) -> None:
        if self.lora_r < 0:
            raise UserError(
                f"`lora_r` must be >= 0 (0 = full fine-tuning), got {self.lora_r}",
                where="command line",
                fix="pass --lora_r 0 for full fine-tuning or a positive rank such as 8.",
            )
        if self.lora_r and self.lora_alpha <= 0:
            raise UserError("`lora_alpha` must be > 0", where="command line", fix="pass e.g. --lora_alpha 16.")
        if not 0 <= self.lora_dropout < 1:
            raise UserError(
                f"`lora_dropout` must be in [0, 1), got {self.lora_dropout}",
                where="command line",
                fix="pass e.g. --lora_dropout 0.05.",
            )

    def peft_config(self):
        """peft's LoraConfig for a causal LM, or None for full fine-tuning."""
        if self.lora_r <= 0:
            return None
        from peft import LoraConfig  # peft imports are slow; only LoRA runs pay for them

        targets = self.lora_target_modules
        targets = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
        return LoraConfig(
            r=self.lora_r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=targets,
            task_type="CAUSAL_LM",
        )
