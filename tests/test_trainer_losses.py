"""EAFT and ASFT in OnPolicySFTTrainer on a tiny model: loss and gradient against naive float64 full-logit
formulas (full fine-tuning and LoRA), padding, accumulation, resume (the anchor stays the starting model)."""

import copy
import math

import pytest
import torch
from peft import LoraConfig

from onsft.engine.trainer import OnPolicySFTTrainer, TrainConfig
from onsft.errors import UserError
from onsft.formulas.weighting import LossConfig
from test_trainer import StopAt, collate, make_dataset, params
from tiny import tiny_model, tiny_tokenizer

CONFIGS = {
    "eaft": LossConfig(loss="eaft", eaft_top_k=5, eaft_alpha=0.7),
    "asft": LossConfig(loss="asft", asft_alpha=0.5),
}


def make_trainer(
    tmp_path, loss, dtype=torch.float32, model=None, peft_config=None, callbacks=None, config=None, **overrides
):
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
        dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        head_token_chunk=16,  # several row and vocabulary tiles even on this tiny model
        head_vocab_chunk=24,
    )
    options.update(overrides)
    return OnPolicySFTTrainer(
        model=model if model is not None else tiny_model(dtype=dtype),
        args=TrainConfig(**options),
        train_dataset=make_dataset(tiny_tokenizer()),
        processing_class=tiny_tokenizer(),
        loss_config=config or copy.deepcopy(CONFIGS[loss]),
        peft_config=peft_config,
        callbacks=callbacks,
    )


def nudge(parameters, scale=0.05, seed=1):
    """Move the trained model away from its start, so the KL and its gradient are not zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in parameters:
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def naive(logits, ref_logits, labels, mask, config):
    """Full float64 logits; sg() parts from detached copies."""
    log_p_all = torch.log_softmax(logits, -1)
    log_p = log_p_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    if config.loss == "eaft":
        q = torch.softmax(logits.detach().topk(config.eaft_top_k, -1).values, -1)
        top_k_entropy = -(q * q.log()).sum(-1)
        per_token = -((top_k_entropy / math.log(config.eaft_top_k)) ** config.eaft_alpha) * log_p
    else:
        log_ref = torch.log_softmax(ref_logits.detach(), -1)
        kl = (log_ref.exp() * (log_ref - log_p_all)).sum(-1)
        per_token = -log_p.detach().exp() * log_p + config.asft_alpha * kl
    return (per_token * mask).sum() / mask.sum()


def check_against_naive(trainer, lm, reference, watched):
    """The trainer's loss and gradient on one padded batch against `naive` (reference: a callable giving the
    starting model's logits)."""
    batch = collate(trainer, [0, 1, 2])
    trainer.model.train()
    ours = trainer.compute_loss(trainer.model, dict(batch))
    g_ours = torch.autograd.grad(ours, watched)
    logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    with torch.no_grad():
        ref_logits = reference(batch)[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    ref = naive(logits, ref_logits, labels.clamp(min=0), mask, trainer.loss_config)
    g_ref = torch.autograd.grad(ref, watched)
    # TRL's kernel gives log p with float32 softmax statistics (see test_trainer); the tiled terms are float64.
    assert abs(ours.item() - ref.item()) < 1e-6 * max(1.0, abs(ref.item()))
    for a, b in zip(g_ours, g_ref):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    return ours.item(), ref.item()


@pytest.mark.parametrize("loss", ["eaft", "asft"])
def test_full_fine_tuning_loss_and_gradient_match_naive(tmp_path, loss):
    model = tiny_model(dtype=torch.float64)
    start = copy.deepcopy(model)
    trainer = make_trainer(tmp_path, loss, model=model)
    nudge(model.parameters())
    watched = [model.model.layers[0].mlp.up_proj.weight, model.lm_head.weight]
    ours, _ = check_against_naive(
        trainer, model, lambda b: start(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, watched
    )
    if loss == "asft":
        # The anchor is the model as the trainer received it, not the nudged one: the KL term is not zero.
        no_kl = make_trainer(tmp_path / "dft", "asft", model=copy.deepcopy(model), config=LossConfig(loss="dft"))
        dft_only = no_kl.compute_loss(no_kl.model, dict(collate(no_kl, [0, 1, 2]))).item()
        assert ours - dft_only > 1e-3


def test_lora_anchor_is_the_model_with_adapters_disabled(tmp_path):
    model = tiny_model(dtype=torch.float64)
    peft = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0)
    trainer = make_trainer(tmp_path, "asft", model=model, peft_config=peft)
    assert trainer.starting_model.copy is None  # no second copy of the weights
    lora = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    nudge(lora, scale=0.3)  # lora_B starts at zero: make the adapters matter

    def reference(batch):
        with trainer.model.disable_adapter():
            return trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    check_against_naive(trainer, trainer.model, reference, lora[:2])


@pytest.mark.parametrize("loss", ["eaft", "asft"])
def test_padded_batch_equals_rows_one_at_a_time(tmp_path, loss):
    model = tiny_model(dtype=torch.float64)
    trainer = make_trainer(tmp_path, loss, model=model)
    nudge(model.parameters())
    rows = [0, 2, 5]  # different lengths, so the batch is padded
    batch = collate(trainer, rows)
    together = trainer.compute_loss(model, dict(batch)).item() * (batch["labels"][:, 1:] != -100).sum().item()
    alone = 0.0
    for r in rows:
        one = collate(trainer, [r])
        alone += trainer.compute_loss(model, dict(one)).item() * (one["labels"][:, 1:] != -100).sum().item()
    assert together == pytest.approx(alone, rel=1e-7)


@pytest.mark.parametrize("loss", ["eaft", "asft"])
def test_gradient_accumulation_equals_one_big_batch(tmp_path, loss):
    # float64 weights: what is left is the ~5e-8 of TRL's float32 softmax statistics (float32 weights add
    # batch-shape-dependent rounding that Adam turns into ~5e-6 differences for nll too).
    big = make_trainer(tmp_path / "a", loss, torch.float64, max_steps=2, per_device_train_batch_size=4)
    big.train()
    small = make_trainer(
        tmp_path / "b", loss, torch.float64, max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2
    )
    small.train()
    assert torch.allclose(params(big.model), params(small.model), atol=1e-6)
    logged = [h for h in big.state.log_history if "nll" in h]
    key = "mean_top_k_entropy" if loss == "eaft" else "mean_kl_to_start"
    values = [h[key] for h in logged]
    assert all(math.isfinite(v) and v >= 0 for v in values)
    if loss == "asft":
        assert values[0] == pytest.approx(0.0, abs=1e-6) and values[-1] > 1e-4  # starts at the anchor, moves
    else:
        assert 0 < values[0] <= math.log(5)


def test_asft_resume_keeps_the_starting_model_as_anchor(tmp_path):
    full = make_trainer(tmp_path / "full", "asft", max_steps=4, save_steps=2)
    full.train()
    first = make_trainer(tmp_path / "cut", "asft", max_steps=4, save_steps=2, callbacks=[StopAt(3)])
    first.train()
    resumed = make_trainer(tmp_path / "cut", "asft", max_steps=4, save_steps=2)
    resumed.train(resume_from_checkpoint=True)
    assert torch.allclose(params(full.model), params(resumed.model), atol=1e-6)
    kl_full = [h["mean_kl_to_start"] for h in full.state.log_history if "mean_kl_to_start" in h]
    kl_resumed = [h["mean_kl_to_start"] for h in resumed.state.log_history if "mean_kl_to_start" in h]
    assert kl_resumed[-1] == pytest.approx(kl_full[-1], rel=1e-4) and kl_full[-1] > 1e-4


def test_eaft_top_k_larger_than_the_vocabulary_is_refused(tmp_path):
    with pytest.raises(UserError, match="exceeds the vocabulary"):
        make_trainer(tmp_path, "eaft", config=LossConfig(loss="eaft", eaft_top_k=10_000))


@pytest.mark.parametrize("loss", ["eaft", "asft", "idft"])
def test_the_idft_lambda_is_logged_for_idft_only(tmp_path, loss):
    """Issue 21: EAFT's and ASFT's logs showed IDFT's schedule, which plays no part in their weights."""
    config = LossConfig(loss="idft") if loss == "idft" else None
    trainer = make_trainer(tmp_path, loss, max_steps=1, save_steps=10, config=config)
    trainer.train()
    steps = [h for h in trainer.state.log_history if "loss" in h]
    assert steps and all(("idft_lambda" in h) == (loss == "idft") for h in steps)
