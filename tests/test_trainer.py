"""OnPolicySFTTrainer on a tiny model: loss against a naive full-logit formula, padding, accumulation, resume."""

import math

import datasets
import pytest
import torch
from transformers import TrainerCallback

from onsft.data.chat import encode_examples
from onsft.data.rows import Example
from onsft.engine.trainer import OnPolicySFTTrainer, TrainConfig
from onsft.formulas.weighting import LossConfig
from test_losses import naive_loss
from tiny import tiny_model, tiny_tokenizer

TEXTS = [
    ("Add 2 and 3.", "2+3=5. \\boxed{5}"),
    ("Copy abc.", "abc \\boxed{abc}"),
    ("Hi?", "Hello there!"),
    ("Reverse xyz.", "zyx, so \\boxed{zyx}"),
    ("Sum 1 2 3", "6"),
    ("Name a colour.", "Blue is a colour."),
    ("Count to 3.", "1 2 3 \\boxed{3}"),
    ("Say yes.", "yes"),
]


def make_dataset(tokenizer, n=8):
    examples = [Example(i, i + 1, {}, [{"role": "user", "content": p}], r) for i, (p, r) in enumerate(TEXTS[:n])]
    encoded, _ = encode_examples(tokenizer, examples, max_length=128)
    return datasets.Dataset.from_dict(
        {"input_ids": [e.input_ids for e in encoded], "labels": [e.labels for e in encoded]}
    )


def make_trainer(tmp_path, loss="idft", dtype=torch.float32, callbacks=None, **overrides):
    tokenizer = tiny_tokenizer()
    model = tiny_model(dtype=dtype)
    options = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=4,
        learning_rate=1e-2,
        bf16=False,
        use_cpu=True,
        seed=0,
        save_steps=2,
        logging_steps=1,
        lr_scheduler_type="linear",
        warmup_steps=0,
        dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    options.update(overrides)
    trainer = OnPolicySFTTrainer(
        model=model,
        args=TrainConfig(**options),
        train_dataset=make_dataset(tokenizer),
        processing_class=tokenizer,
        loss_config=LossConfig(loss=loss, schedule_start=0.25, schedule_end=0.75),
        callbacks=callbacks,
    )
    return trainer


def collate(trainer, rows):
    return trainer.data_collator([trainer.train_dataset[i] for i in rows])


@pytest.mark.parametrize("loss", ["nll", "dft", "idft"])
def test_fused_loss_and_gradient_match_naive_full_logits(tmp_path, loss):
    trainer = make_trainer(tmp_path, loss=loss, dtype=torch.float64)
    model = trainer.model
    model.train()
    batch = collate(trainer, [0, 1, 2])
    ours = trainer.compute_loss(model, dict(batch))
    g_ours = torch.autograd.grad(ours, model.model.layers[0].mlp.up_proj.weight)[0]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    fixed = {"nll": 0.0, "dft": 1.0, "idft": None}[loss]
    lam = trainer.current_lambda()
    ref = naive_loss(logits, labels.clamp(min=0), mask, lam=lam, fixed_gamma=fixed)
    g_ref = torch.autograd.grad(ref, model.model.layers[0].mlp.up_proj.weight)[0]
    # TRL's kernel accumulates its softmax statistics in float32, hence ~1e-7 relative agreement.
    assert abs(ours.item() - ref.item()) < 1e-6 * max(1.0, abs(ref.item()))
    assert torch.allclose(g_ours, g_ref, rtol=1e-4, atol=1e-7)


def test_padded_batch_equals_rows_one_at_a_time(tmp_path):
    trainer = make_trainer(tmp_path, dtype=torch.float64)
    model = trainer.model
    rows = [0, 2, 5]  # different lengths, so the batch is padded
    batch = collate(trainer, rows)
    total_tokens = (batch["labels"][:, 1:] != -100).sum()
    together = trainer.compute_loss(model, dict(batch)).item() * total_tokens.item()
    alone = 0.0
    for r in rows:
        one = collate(trainer, [r])
        alone += trainer.compute_loss(model, dict(one)).item() * (one["labels"][:, 1:] != -100).sum().item()
    # float32 softmax accumulators in the fused head: agreement to ~1e-8 relative, not bitwise.
    assert together == pytest.approx(alone, rel=1e-7)


def params(model):
    return torch.cat([p.detach().flatten().double() for p in model.parameters()])


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    big = make_trainer(tmp_path / "a", max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=1)
    big.train()
    small = make_trainer(tmp_path / "b", max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    small.train()
    assert torch.allclose(params(big.model), params(small.model), atol=1e-6)


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    full = make_trainer(tmp_path / "full", max_steps=6, save_steps=2)
    full.train()
    first = make_trainer(tmp_path / "cut", max_steps=6, save_steps=2, callbacks=[StopAt(3)])
    first.train()  # stops after step 3; the last checkpoint is step 2
    resumed = make_trainer(tmp_path / "cut", max_steps=6, save_steps=2)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 6
    assert torch.allclose(params(full.model), params(resumed.model), atol=1e-6)
    # The IDFT schedule (a function of the restored step counter) matches step for step.
    lam_full = [h["idft_lambda"] for h in full.state.log_history if "idft_lambda" in h]
    lam_resumed = [h["idft_lambda"] for h in resumed.state.log_history if "idft_lambda" in h]
    assert lam_full == lam_resumed and lam_full[0] == 0.0 and lam_full[-1] == 1.0


def test_logs_show_idft_at_work_and_eval_reports_plain_nll(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=2)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "mean_phi" in h]
    for key in ("nll", "weighted_loss", "mean_phi", "mean_gamma", "frac_gamma_min", "frac_gamma_max"):
        assert key in logged[0] and math.isfinite(logged[0][key])
    assert 0.1 <= logged[0]["mean_gamma"] <= 2.0
    metrics = trainer.evaluate(trainer.train_dataset)
    trainer.loss_config.loss = "nll"
    model = trainer.model.eval()
    batch = collate(trainer, list(range(8)))
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    assert metrics["eval_loss"] == pytest.approx(out.loss.item(), rel=1e-4)


def test_nonfinite_loss_stops_or_skips(tmp_path):
    from onsft.errors import UserError

    trainer = make_trainer(tmp_path / "stop")
    batch = dict(collate(trainer, [0, 1]))
    with torch.no_grad():
        trainer.model.model.norm.weight.fill_(float("nan"))
    with pytest.raises(UserError, match="non-finite loss"):
        trainer.compute_loss(trainer.model, dict(batch))
    skipper = make_trainer(tmp_path / "skip", nonfinite="skip")
    with torch.no_grad():
        skipper.model.model.norm.weight.fill_(float("nan"))
    loss = skipper.compute_loss(skipper.model, dict(batch))
    assert loss.item() == 0.0 and skipper.skipped_nonfinite == 1
