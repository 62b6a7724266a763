"""The benchmark scripts run (`--quick`: tiny sizes, 2 rounds) and their results hold the checks that make
their comparisons fair: equal losses at equal settings, equal scores, equal tokens. Timings are not tested."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

import onsft.organism

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
# A small local model folder for `--model` (the scripts' real-model path; smollm2 is too slow for a test).
LOCAL_MODEL = Path(onsft.organism.__file__).parent / "model"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_spread(s: dict, rounds: int) -> None:
    assert s["n"] == rounds == len(s["all"])
    assert s["min"] <= s["q1"] <= s["median"] <= s["q3"] <= s["max"]
    assert all(math.isfinite(v) and v > 0 for v in s["all"])


def rendered(name: str, tmp_path) -> str:
    """docs/benchmarks.md's table for `name`, written by benchmarks/report.py from the JSON in tmp_path."""
    doc = tmp_path / "doc.md"
    doc.write_text(f"before\n<!-- BEGIN {name} -->\nold\n<!-- END {name} -->\nafter\n")
    load("report").main(["--results", str(tmp_path), "--doc", str(doc)])
    text = doc.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "old" not in text
    return text


def test_train_step_quick(tmp_path):
    result = load("train_step").main(["--quick", "--out", str(tmp_path / "train_step.json")])
    losses = result["losses"]
    # The headline compares equal work: TRL's nll and ours at the same tiles give the same loss, and no loss
    # depends on the tiles.
    assert losses["nll@cpu"] == pytest.approx(losses["trl_nll@cpu"], rel=1e-5)
    assert losses["trl_nll@trl"] == pytest.approx(losses["trl_nll@cpu"], rel=1e-5)
    assert losses["idft@trl"] == pytest.approx(losses["idft@cpu"], rel=1e-5)
    assert losses["naive_fp32"] == pytest.approx(losses["idft@cpu"], rel=1e-4)
    for ratio in result["ratios"].values():
        check_spread(ratio, 2)
    # Quick mode measures in this process, so only the code path is checked: the kernel batches per-thread RSS
    # counters (up to 64 pages each), so a step that allocates nothing can read a few hundred KiB below zero.
    assert result["memory"]["step_mib"]["idft@cpu"] > -4
    assert result["top_k"]["max_abs_difference_to_full_logits"] < 1e-4
    assert "| **IDFT / TRL nll, same tiles 1024 x 8192** (the weighting's cost) |" in rendered("train_step", tmp_path)


def test_audit_quick(tmp_path):
    result = load("audit").main(["--quick", "--out", str(tmp_path / "audit.json")])
    positions = result["head_positions"]
    assert positions["forward"] > positions["audit_all"] > positions["audit"] > 0
    assert result["max_abs_phi_difference_to_naive_fp32"]["audit"] < 1e-4
    for ratio in result["throughput_ratio_vs_forward"].values():
        check_spread(ratio, 2)
    assert result["variants"]["audit"]["peak_delta_mib"] >= 0
    assert "**audit on every position / forward** (equal token counts" in rendered("audit", tmp_path)


def test_hinted_quick(tmp_path):
    result = load("hinted").main(["--quick", "--out", str(tmp_path / "hinted.json")])
    assert result["single_tokens_equal_batched"] == {8: True, 16: True}
    ratios = result["ratios"]
    for n in (8, 16):
        # The split multiplies back to the total, round by round.
        for c, b, t in zip(ratios[f"caching@{n}"]["all"], ratios[f"batching@{n}"]["all"], ratios[f"total@{n}"]["all"]):
            assert c * b == pytest.approx(t, rel=1e-9)
    for ratio in ratios.values():
        check_spread(ratio, 2)
    assert "L = 16: batching (cached batch of 4 / cached single row; same tokens: True)" in rendered("hinted", tmp_path)


def test_hinted_breakdown_quick(tmp_path):
    out = tmp_path / "hinted_breakdown.json"
    result = load("hinted").main(["--quick", "--breakdown", "--out", str(out)])
    share = result["prefill_share_of_hinted"]
    check_spread(share, 2)
    assert share["max"] < 1.5  # one token's decode cannot cost much more than sixteen
    assert "on both contexts (8 rows" in rendered("hinted_breakdown", tmp_path)


def test_hinted_model_quick(tmp_path):
    """`--model` with a local folder: real-text prompts (reasoning-gym questions) in the model's chat template,
    the hinted context in the model's own hint format, the same checks; the output and its table name the model."""
    module = load("hinted")
    assert module.model_slug("smollm2-135m") == "smollm2-135m"
    assert module.model_slug("/m/SmolLM2.Q4_1.gguf") == "SmolLM2.Q4_1"
    assert module.model_slug(str(LOCAL_MODEL)) == "model"
    result = module.main(["--quick", "--model", str(LOCAL_MODEL), "--out", str(tmp_path / "hinted-model.json")])
    assert result["model"] == str(LOCAL_MODEL) and result["prompts"]["hint_source"] == "onsft.json"
    assert result["prompt_mean_tokens"]["hinted"] > result["prompt_mean_tokens"]["plain"]
    assert result["single_tokens_equal_batched"] == {8: True, 16: True}
    for ratio in result["ratios"].values():
        check_spread(ratio, 2)
    text = rendered("hinted-model", tmp_path)
    assert f"`{LOCAL_MODEL}`" in text and "reasoning-gym" in text and "| batched@16 | 64 |" in text


def test_skewed_quick(tmp_path):
    result = load("skewed").main(["--quick", "--out", str(tmp_path / "skewed.json")])
    assert result["static_equals_continuous"]
    counts = result["counts"]
    # The same tokens in every variant; continuous batching admits into freed slots, static does not.
    assert counts["static"]["tokens"] == counts["continuous"]["tokens"] == counts["uniform"]["tokens"] == 40
    assert counts["continuous"]["admissions"] > counts["static"]["admissions"]
    assert counts["uniform"]["idle_slot_share"] == 0
    for ratio in result["ratios"].values():
        check_spread(ratio, 2)
    assert "| **continuous / static schedule** (skewed workload) |" in rendered("skewed", tmp_path)


def test_skewed_model_quick(tmp_path):
    """`--model` with a local folder; the fit of time against decode steps is recorded and rendered."""
    result = load("skewed").main(["--quick", "--model", str(LOCAL_MODEL), "--out", str(tmp_path / "skewed-x.json")])
    assert result["model"] == str(LOCAL_MODEL) and result["static_equals_continuous"]
    for spread in result["step_cost"].values():
        assert spread["n"] == 2 and all(math.isfinite(v) for v in spread["all"])
    text = rendered("skewed-x", tmp_path)
    assert f"`{LOCAL_MODEL}`" in text and "fixed cost of a decode step" in text
