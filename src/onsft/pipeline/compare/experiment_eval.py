"""An experiment's evaluator: its test sets loaded once, any model (or checkpoint) measured on them in process:
accuracy per test set and KL drift from the base model on the base model's own continuations."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from onsft.data.chat import encode_prompt
from onsft.data.rows import dataset_identity, load_examples
from onsft.engine.kl import base_continuations, kl_on_continuations
from onsft.pipeline.compare.experiment import EVALUATED_SETS, Experiment
from onsft.pipeline.evaluate.evaluation import evaluate_model
from onsft.runtime.fingerprints import config_defaults
from onsft.runtime.models import load_model, load_tokenizer


class Evaluator:
    """Loads each test set once and evaluates models on them, in process."""

    def __init__(self, exp: Experiment, sampling, verify):
        self.exp = exp
        self._settings: dict | None = None
        self._continuations: list[list[int]] | None = None
        self.sampling, self.verify = sampling, verify
        self.verifier = self.verify.build()
        self.sets = {
            name: load_examples(
                getattr(exp, name), require_response=False, require_answer=True, offline=exp.model.offline
            )
            for name in EVALUATED_SETS
            if getattr(exp, name)
        }
        self.tokenizer = load_tokenizer(exp.model)
        self.base = load_model(exp.model)
        kl_source = exp.kl_prompts or exp.retention or exp.in_domain
        kl_examples = load_examples(kl_source, require_response=False, offline=exp.model.offline)[: exp.kl_limit]
        self.kl_prompts = [encode_prompt(self.tokenizer, e.prompt, kl_source) for e in kl_examples]

    def load(self, path: Path):
        """A trained model (or checkpoint) on the experiment's device and dtype."""
        return load_model(dataclasses.replace(self.exp.model, model=str(path), model_revision=None))

    def accuracy(self, model, limit: int = 0) -> dict[str, float]:
        result = {}
        for name, examples in self.sets.items():
            rows = examples[:limit] if limit else examples
            metrics = evaluate_model(model, self.tokenizer, rows, self.sampling, self.verifier)
            result[name] = metrics["accuracy"]
            if metrics.get("by_task") and not limit:
                result[f"{name}_by_task"] = {t: m["accuracy"] for t, m in metrics["by_task"].items()}
        return result

    def kl(self, model) -> float:
        """KL(base || model) per token on the base model's greedy continuations of the KL prompts (generated
        once per evaluator: they do not depend on the model measured)."""
        if self._continuations is None:
            self._continuations = base_continuations(
                self.base,
                self.tokenizer,
                self.kl_prompts,
                max_new_tokens=self.sampling.max_new_tokens,
                batch_size=self.sampling.batch_size,
            )
        mean, _ = kl_on_continuations(
            self.base,
            model,
            self.tokenizer,
            self.kl_prompts,
            self._continuations,
            batch_size=self.sampling.batch_size,
        )
        return mean

    def full(self, model, limit: int = 0) -> dict:
        return {**self.accuracy(model, limit), "kl_drift": self.kl(model)}

    def settings(self) -> dict:
        """What the cached evaluations (base/eval.json, each cell's eval.json) depend on, the base model included,
        and the test sets by content (a test file edited in place must not reuse evaluations of the old one)."""
        if self._settings is None:
            self._settings = {
                "model": self.exp.model.recorded(),
                "eval": self.exp.eval,
                "kl_limit": self.exp.kl_limit,
                "sets": {
                    name: dataset_identity(path)
                    for name in (*EVALUATED_SETS, "kl_prompts")
                    if (path := getattr(self.exp, name))
                },
            }
        return self._settings

    def defaults(self) -> dict:
        """The defaults of `settings`' options (an evaluation cached before an option existed matches when the
        option holds its default now)."""
        return {"model": config_defaults(self.exp.model)}
