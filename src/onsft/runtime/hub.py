"""Models and datasets from the Hugging Face Hub: fetched once into the Hugging Face cache, then read from it.

`snapshot(name, kind)` returns a local folder holding the repository: from the cache when it is there
(no network at all), else downloaded, unless downloads are off (`--offline`, or `HF_HUB_OFFLINE=1` as
for every Hugging Face tool). Failures are one `UserError` naming the repository and the fix.
`looks_like_repo_id` tells a Hub name from a local path, so a mistyped file name is reported as a
missing file rather than looked up on the Hub.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from onsft.errors import UserError

# owner/name or name: letters, digits, '-', '_', '.'; no leading '.' or '-' (the Hub's own rule, simplified).
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
_LOCAL_SUFFIXES = (".jsonl", ".json", ".ndjson", ".csv", ".parquet", ".pq", ".gguf", ".yaml", ".yml", ".txt")
# What a causal LM needs; other files of a repository (other formats' weights, images) are not fetched.
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py", "*.gguf"]


def offline_requested(flag: bool = False) -> bool:
    """Downloads are off with --offline or HF_HUB_OFFLINE=1 (the variable every Hugging Face library reads)."""
    value = os.environ.get("HF_HUB_OFFLINE", "")
    return flag or value.strip().lower() in ("1", "true", "yes", "on")


def looks_like_repo_id(name: str) -> bool:
    """True for `owner/name` or `name` shaped strings that are not paths to files (no known data suffix,
    no './', '~' or '/' prefix, at most one '/')."""
    if name.startswith((".", "/", "~")) or name.lower().endswith(_LOCAL_SUFFIXES) or "\\" in name:
        return False
    return bool(_REPO_ID.match(name))


def _download(name: str, kind: str, revision: str | None, local_only: bool, patterns: list[str] | None) -> str:
    from huggingface_hub import snapshot_download

    return snapshot_download(
        name,
        repo_type=kind,
        revision=revision,
        local_files_only=local_only,
        allow_patterns=patterns,
    )


def snapshot(
    name: str,
    kind: str = "model",
    *,
    revision: str | None = None,
    offline: bool = False,
    patterns: list[str] | None = None,
    aliases: Sequence[str] = (),
) -> Path:
    """A local folder with the Hub repository `name` (`kind` "model" or "dataset"). `aliases` are the other
    names the caller accepts (model aliases): an unknown name's error lists them."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = "model" if kind == "model" else "dataset"
    not_alias = f"not an alias ({', '.join(aliases)}), " if aliases else ""
    local = "a local path" + (f" or one of the aliases {', '.join(aliases)}" if aliases else "")
    try:
        return Path(_download(name, kind, revision, True, patterns))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        pass  # not cached (or cached incompletely): fetch it, unless downloads are off
    except HFValidationError:
        raise UserError(
            f"'{name}' is not a valid Hugging Face {what} name",
            where=name,
            fix=f"pass {local} or a Hub id like owner/{what}-name.",
        ) from None
    if offline_requested(offline):
        raise UserError(
            f"unknown {what} '{name}': {not_alias}not a local path and not in the Hugging Face cache, and downloads "
            "are off (--offline or HF_HUB_OFFLINE=1)",
            where=name,
            fix=f"run once with network access to cache it (or `hf download {name}"
            + (" --repo-type dataset" if kind == "dataset" else "")
            + f"`), or pass {local}.",
        )
    print(f"onsft: downloading {what} '{name}' from the Hugging Face Hub (cached for later runs)", file=sys.stderr)
    try:
        return Path(_download(name, kind, revision, False, patterns))
    except (GatedRepoError, RepositoryNotFoundError) as error:
        gated = isinstance(error, GatedRepoError)
        raise UserError(
            f"the Hugging Face Hub {'refuses access to' if gated else 'has no'} {what} '{name}'"
            + (" (gated)" if gated else " (or it is private)"),
            where=name,
            fix="check the name; for a private or gated repository accept its terms and log in "
            f"(`hf auth login` or HF_TOKEN); or pass {local}.",
        ) from None
    except RevisionNotFoundError:
        raise UserError(
            f"{what} '{name}' has no revision '{revision}'", where=name, fix="pass an existing branch, tag or commit."
        ) from None
    except OfflineModeIsEnabled:
        raise UserError(
            f"unknown {what} '{name}': {not_alias}not cached and the Hub is in offline mode",
            where=name,
            fix=f"unset HF_HUB_OFFLINE to download it, or pass {local}.",
        ) from None
    except Exception as error:  # connection errors, HTTP errors, a full disk: all 'could not fetch'
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"cannot download {what} '{name}' from the Hugging Face Hub ({first})",
            where=name,
            fix="check the network (or HF_ENDPOINT / proxy settings), or pass a local path.",
        ) from None
