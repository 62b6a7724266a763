"""The one loader of models and tokenizers, their context length, and the settings that choose them.

A model is named by a local folder (saved with `save_pretrained`; a LoRA adapter folder, e.g. a training
checkpoint, loads as its base model with the adapter merged), a `.gguf` file (or a folder with one),
an alias (`organism`, `smollm2-135m`, see `onsft.runtime.aliases`), or a Hugging Face Hub id, which is
downloaded once into the Hugging Face cache and read from it afterwards (`onsft.runtime.hub`; `--offline`
or `HF_HUB_OFFLINE=1` forbid the download). `ModelArguments` is declared once here and composed into every
command that loads a model, as TRL composes its `ModelConfig` with each trainer's config.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from onsft.errors import UserError
from onsft.runtime import hub
from onsft.runtime.aliases import ALIASES, resolve_alias, smollm2_path
from onsft.runtime.device import DEVICE_HELP, DTYPE_CHOICES, resolve_device, resolve_dtype
from onsft.runtime.records import atomic_directory


@dataclass
class ModelArguments:
    """Which model, where it runs and in which precision."""

    model: str = field(
        default="organism",
        metadata={
            "help": "Model: a Hugging Face Hub id (downloaded and cached on first use), a local folder, a .gguf "
            "file, or an alias (organism: the embedded model; smollm2-135m)."
        },
    )
    model_revision: str | None = field(
        default=None, metadata={"help": "Branch, tag or commit of a Hub model (default: its main branch)."}
    )
    device: str = field(default="auto", metadata={"help": f"Where the model runs: {DEVICE_HELP}"})
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Weights' precision: auto (bfloat16 on a GPU that supports it, else float32), "
            + ", ".join(DTYPE_CHOICES[1:])
            + "."
        },
    )
    offline: bool = field(
        default=False,
        metadata={
            "help": "Never download models or datasets: use local files and caches only (as HF_HUB_OFFLINE=1 does)."
        },
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow model code from the Hub repository (only for models you trust)."}
    )

    def recorded(self) -> dict:
        """These settings as a run records them (its settings, cache keys): without `device` and `offline`, which
        change where the model runs and where it is read from, not what it computes."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("device", "offline")}

    def validate(self) -> None:
        if not self.model:
            raise UserError("`model` is required", where="command line", fix="pass --model NAME_OR_PATH.")
        resolve_dtype(self.dtype, torch.device("cpu"))  # name check only; the device decides `auto`
        if self.device != "auto":  # an absent accelerator (or one this PyTorch lacks), before any output
            resolve_device(self.device)


def resolve_model_path(name_or_path: str | os.PathLike, *, revision: str | None = None, offline: bool = False) -> str:
    """A local path for a model alias, folder, .gguf file or Hub id (downloaded once); UserError otherwise."""
    name = str(name_or_path)
    alias = resolve_alias(name)
    if alias is not None:
        return alias
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
    # A name without "/" close to an alias is a typo of it, not a Hub id to fetch (which would blame the network).
    close = difflib.get_close_matches(name.lower(), ALIASES, n=1) if "/" not in name and os.sep not in name else []
    if close:
        raise UserError(
            f"unknown model '{name}': not an alias ({', '.join(ALIASES)}) and no such local folder or file",
            where=name,
            fix=f"did you mean {close[0]}? (or pass a Hub id like owner/model-name)",
        )
    if not hub.looks_like_repo_id(name):
        raise UserError(
            f"unknown model '{name}': not an alias ({', '.join(ALIASES)}), no such local folder or file, and not a "
            "Hugging Face Hub id",
            where=name,
            fix="check the path, or pass a Hub id like owner/model-name.",
        )
    folder = hub.snapshot(name, "model", revision=revision, offline=offline, patterns=hub.MODEL_FILES, aliases=ALIASES)
    if not _is_model(folder):
        raise UserError(
            f"Hub repository '{name}' holds no transformers model (no config.json, no .gguf)",
            where=name,
            fix="pass the id of a causal language model.",
        )
    return str(folder)


def _is_model(path: Path) -> bool:
    if path.is_file():
        return path.suffix == ".gguf"
    return (path / "config.json").is_file() or any(path.glob("*.gguf")) or _adapter_base(path) is not None


ADAPTER_CONFIG = "adapter_config.json"


def _adapter_base(path: Path) -> str | None:
    """The base model of a peft adapter folder without a model of its own (a LoRA checkpoint), else None."""
    if (path / "config.json").is_file() or not (path / ADAPTER_CONFIG).is_file():
        return None
    try:
        base = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    return base if isinstance(base, str) and base else None


def _gguf_location(path: str) -> tuple[str, str | None]:
    """(folder for from_pretrained, gguf file name or None)."""
    p = Path(path)
    if p.is_file():
        return str(p.parent), p.name
    if (p / "config.json").is_file() or _adapter_base(p) is not None:
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
        return UserError(f"loading a GGUF {what} needs the gguf package", where=path, fix="pip install gguf")
    return UserError(
        f"cannot load the {what}: {error}",
        where=path,
        fix="check that the folder holds a complete transformers model (config.json, weights, tokenizer files).",
    )


def _args(model: ModelArguments | str) -> ModelArguments:
    return ModelArguments(model=str(model)) if not isinstance(model, ModelArguments) else model


def load_tokenizer(model: ModelArguments | str | os.PathLike):
    """The model's tokenizer (with its chat template); pad token set to EOS when the model has none."""
    from transformers import AutoTokenizer

    args = _args(model)
    path = resolve_model_path(args.model, revision=args.model_revision, offline=args.offline)
    base = _adapter_base(Path(path))
    if base is not None and not (Path(path) / "tokenizer_config.json").is_file():
        return load_tokenizer(dataclasses.replace(args, model=base, model_revision=None))  # an adapter alone
    folder, gguf = _gguf_location(path)
    # Converting a GGUF tokenizer takes ~10 s on 2 cores; for the cached smollm2 it is done once and
    # the converted tokenizer is kept beside the .gguf (a few MB).
    converted = Path(folder) / "tokenizer"
    cacheable = gguf is not None and Path(folder).resolve() == smollm2_path(fetch=False).resolve()
    try:
        if cacheable and (converted / "tokenizer_config.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(converted, local_files_only=True)
        else:
            tokenizer = AutoTokenizer.from_pretrained(
                folder, gguf_file=gguf, local_files_only=True, trust_remote_code=args.trust_remote_code
            )
    except (OSError, ValueError, KeyError, ImportError, TypeError) as error:
        raise _load_error(error, path, "tokenizer") from None
    if cacheable and not converted.is_dir():
        # Another process may finish first (its folder is kept); a read-only cache only costs time on the next load.
        with contextlib.suppress(OSError), atomic_directory(converted, unique=True, keep_existing=True) as staging:
            tokenizer.save_pretrained(staging)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # batching needs a pad id; masked out anyway
    return tokenizer


def _gguf_bar_follows_switch() -> None:
    """transformers' GGUF loader draws its "de-quantizing" bar with tqdm directly, past the progress-bar switch
    that `configure_output` sets; hand it transformers' own switch-aware tqdm so it shows only with --verbose."""
    import transformers.modeling_gguf_pytorch_utils as gguf_loader
    from transformers.utils import logging as transformers_logging

    if hasattr(gguf_loader, "tqdm"):
        gguf_loader.tqdm = transformers_logging.tqdm


def load_model(
    model: ModelArguments | str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
):
    """A causal LM in eval mode, on `device` in `dtype`.

    Given `ModelArguments`, its `device` and `dtype` decide (through `onsft.runtime.device`) unless
    overridden here; given a bare name or path, the model stays on the CPU in its checkpoint's own dtype
    (float32 for the organism and GGUF files) unless `device` / `dtype` say otherwise."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    args = _args(model)
    given = isinstance(model, ModelArguments)
    target = torch.device(device) if device is not None else (resolve_device(args.device) if given else None)
    if isinstance(dtype, str):
        dtype = resolve_dtype(dtype, target or torch.device("cpu"))
    elif dtype is None and given:
        dtype = resolve_dtype(args.dtype, target)
    path = resolve_model_path(args.model, revision=args.model_revision, offline=args.offline)
    base = _adapter_base(Path(path))
    if base is not None:
        # A LoRA checkpoint: its base model with the adapter merged in, an ordinary model from here on.
        from peft import PeftModel

        loaded = load_model(dataclasses.replace(args, model=base, model_revision=None), device=target, dtype=dtype)
        try:
            return PeftModel.from_pretrained(loaded, path).merge_and_unload().eval()
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise _load_error(error, path, "LoRA adapter") from None
    folder, gguf = _gguf_location(path)
    if gguf is not None:
        _gguf_bar_follows_switch()
    try:
        # dtype=None must not be passed on: transformers then keeps the weights' stored dtype.
        extra = {} if dtype is None else {"dtype": dtype}
        loaded = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=gguf, local_files_only=True, trust_remote_code=args.trust_remote_code, **extra
        )
    except (OSError, ValueError, KeyError, ImportError, TypeError, SafetensorError) as error:
        # SafetensorError: a weights file cut short (an interrupted download or copy).
        raise _load_error(error, path, "model") from None
    if gguf is not None:
        # transformers dequantises GGUF weights to ordinary tensors but keeps a GGUF "quantizer" on the model,
        # which makes Trainer refuse to fine-tune it and save_pretrained refuse to save it. The weights are
        # plain float tensors, so the marker is dropped: the model then trains and saves like any other.
        loaded.hf_quantizer = None
        loaded.is_quantized = False
        if hasattr(loaded.config, "quantization_config"):
            del loaded.config.quantization_config
    if target is not None:
        loaded.to(target)
    loaded.eval()
    return loaded


def check_model(model: ModelArguments | str):
    """A model checked without loading its weights, for one a command loads only after hours of other work:
    the name resolves, config.json reads, and every safetensors file's header is complete (a copy cut
    short fails here). Returns its config (None for a .gguf file)."""
    from safetensors import SafetensorError, safe_open
    from transformers import AutoConfig

    args = _args(model)
    path = resolve_model_path(args.model, revision=args.model_revision, offline=args.offline)
    folder, gguf = _gguf_location(path)
    if gguf is not None:
        return None
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=args.trust_remote_code)
        for weights in sorted(Path(folder).glob("*.safetensors")):
            with safe_open(str(weights), "pt"):
                pass
    except (OSError, ValueError, KeyError, SafetensorError) as error:
        raise _load_error(error, path, "model") from None
    return config


def vocabulary_size(config) -> int | None:
    config = getattr(config, "text_config", None) or config
    return getattr(config, "vocab_size", None)


def context_length(model_or_config) -> int | None:
    """The most positions the model has (max_position_embeddings of its text config), or None if unknown."""
    config = getattr(model_or_config, "config", model_or_config)
    config = getattr(config, "text_config", None) or config
    return getattr(config, "max_position_embeddings", None)


def configured_context_length(model: ModelArguments | str) -> int | None:
    """The context length from the model's config alone, without loading weights (None for a .gguf file)."""
    from transformers import AutoConfig

    args = _args(model)
    try:
        path = resolve_model_path(args.model, revision=args.model_revision, offline=args.offline)
        loaded = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError, KeyError):  # a .gguf file has no config.json; its limit applies when decoding
        return None
    return context_length(loaded)


def check_context(context: int | None, lengths: list[tuple[int, int | None]], where: str) -> None:
    """Refuse rows (length, line) longer than the model's positions: they crash models with learned position
    embeddings (an IndexError deep in the forward pass) and leave the trained range of rotary ones;
    --max_length alone does not catch them when it is larger than the model's context."""
    over = [(n, line) for n, line in lengths if context and n > context]
    if over:
        raise UserError(
            f"{len(over)} row(s) are longer than the model's context of {context} tokens (first: {over[0][0]} tokens)",
            where=where,
            line=over[0][1],
            fix=f"pass --max_length {context} (or less), with --overlong truncate or drop if needed.",
        )


def pad_token_id(tokenizer) -> int:
    """The id padding uses: the tokenizer's pad token, else its EOS, else 0 (always masked out)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def read_model_info(model: ModelArguments | str) -> dict:
    """The model folder's onsft.json ({} when there is none): the hint format a model was trained on."""
    args = _args(model)
    path = Path(resolve_model_path(args.model, revision=args.model_revision, offline=args.offline))
    path = path.parent if path.is_file() else path
    info = path / "onsft.json"
    if not info.is_file():
        return {}
    try:
        value = json.loads(info.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(
            f"cannot read the model's onsft.json ({error})",
            where=str(info),
            fix="fix or delete the file, or pass --hint_template and --answer_marker.",
        ) from None
    return value if isinstance(value, dict) else {}
