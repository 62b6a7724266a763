"""`ShardStore`: one process's resumable rows of an output file, and rank 0's merge in input order."""

from __future__ import annotations

from pathlib import Path

from onsft.runtime.device import Processes
from onsft.runtime.records import ResumableJsonl, partial_rows, write_jsonl_atomic

# Row keys that are bookkeeping, never written to a final file: the input index, sampled token phi for plots.
PRIVATE = ("_index", "_token_phi")


def public(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in PRIVATE}


def _read_partial(path: Path) -> list[dict]:
    """Rows of another process's finished partial file (the first line is ResumableJsonl's fingerprint)."""
    raw = path.read_bytes()
    lines = raw[: raw.rfind(b"\n") + 1].decode("utf-8").splitlines()
    return partial_rows(lines[1:])


class ShardStore:
    """This process's resumable rows of one output file, and rank 0's merge into out/<name>.jsonl.

    One process writes out/<name>.jsonl.partial; N processes write out/<name>.rank<r>-of-<N>.jsonl.partial.
    After all processes finish, rank 0 merges in input order, writes the final file atomically and only
    then deletes the partial files: a kill at any point leaves either partials to resume from or the
    finished file."""

    def __init__(self, out: Path, name: str, dist: Processes, fingerprint: dict, defaults: dict | None = None):
        self.out, self.name, self.dist = out, name, dist
        stem = f"{name}.jsonl" if dist.world == 1 else f"{name}.rank{dist.rank}-of-{dist.world}.jsonl"
        self.store = ResumableJsonl(out / stem, {**fingerprint, "set": name, "world": dist.world}, defaults)

    @property
    def done(self) -> dict[int, dict]:
        return self.store.done

    def add(self, rows: list[dict]) -> None:
        self.store.append_many(rows)

    def merge(self) -> list[dict] | None:
        self.store.close()
        self.dist.barrier()
        merged = None
        if self.dist.main:
            by_index = dict(self.store.done)
            others = [
                self.out / f"{self.name}.rank{r}-of-{self.dist.world}.jsonl.partial" for r in range(1, self.dist.world)
            ]
            for part in others:
                by_index.update((row["_index"], row) for row in _read_partial(part))
            merged = [by_index[i] for i in sorted(by_index)]
            write_jsonl_atomic(self.out / f"{self.name}.jsonl", [public(r) for r in merged])
            for part in [self.store.partial, *others]:
                part.unlink(missing_ok=True)
        self.dist.barrier()
        return merged
