"""Where and how a job runs, decided in this one place: device, dtype, process rank, and random streams.

Every command that loads a model resolves `--device` and `--dtype` here (`auto`: the accelerator when
the machine has one, bfloat16 on a GPU that supports it, else the CPU in float32). Under `accelerate
launch` / torchrun each process learns its rank, the number of processes and its own accelerator from
`Processes`. Seeds of sampling streams come from `stream_seed`, so a chunk of work samples the same
whichever process runs it, in whatever order, before or after a restart.
"""

from __future__ import annotations

import hashlib

import torch

from onsft.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)
DEVICE_HELP = "auto (the accelerator when there is one, else the CPU), cpu, cuda, cuda:N, xpu or mps."


def accelerator() -> torch.device | None:
    """The machine's accelerator, or None on a CPU-only machine. The one probe every command goes through
    (tests patch it to stand in for a GPU)."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return torch.device("xpu")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return None


def check_device_name(name: str) -> None:
    kind = name.split(":", 1)[0]
    index = name.split(":", 1)[1] if ":" in name else "0"
    if name != "auto" and (kind not in ("cpu", "cuda", "xpu", "mps") or not index.isdigit()):
        raise UserError(f"unknown device `{name}`", where="--device", fix=f"use {DEVICE_HELP}")


ACCELERATORS = {"cuda": "CUDA GPU", "xpu": "Intel XPU", "mps": "Apple MPS device"}


def device_count(kind: str) -> int:
    """Devices of this kind that this machine and this PyTorch build can use (0: none, or a PyTorch built
    without support for them, which would fail only when the first tensor moves there)."""
    if kind == "cuda":
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    if kind == "xpu":
        return torch.xpu.device_count() if hasattr(torch, "xpu") and torch.xpu.is_available() else 0
    if kind == "mps":
        return int(torch.backends.mps.is_available())
    return 1


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` -> the accelerator, else the CPU; an explicit accelerator that is absent (or that this PyTorch
    lacks) is a UserError, raised before a command writes anything (`ModelArguments.validate` asks here)."""
    check_device_name(name)
    if name == "auto":
        return accelerator() or torch.device("cpu")
    device = torch.device(name)
    count = device_count(device.type)
    if device.type in ACCELERATORS and count == 0:
        raise UserError(
            f"device `{name}` requested but no {ACCELERATORS[device.type]} is available (to this machine and "
            f"this PyTorch {torch.__version__})",
            where="--device",
            fix="use --device cpu (or auto).",
        )
    if device.type in ACCELERATORS and device.index is not None and device.index >= count:
        raise UserError(
            f"device `{name}` requested but this machine has {count} {ACCELERATORS[device.type]}(s)",
            where="--device",
            fix=f"pick an existing index, or --device {device.type}.",
        )
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` -> bfloat16 on a CUDA GPU that supports it (half the memory, tensor cores), else float32."""
    if name not in DTYPE_CHOICES:
        raise UserError(f"unknown dtype `{name}`", where="--dtype", fix=f"use one of {', '.join(DTYPE_CHOICES)}.")
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def resolve_precision(args) -> None:
    """Mixed precision of a transformers `TrainingArguments`, before it validates: bf16 unset -> on only
    where a GPU supports it (TRL turns it on by default, which transformers rejects on a CPU-only
    machine); bf16 asked for on a machine without an accelerator -> CPU autocast, which transformers
    allows only with use_cpu."""
    has_accelerator = accelerator() is not None
    if args.bf16 is None and not args.fp16:
        args.bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported() and not args.use_cpu)
    if args.bf16 and not has_accelerator:
        args.use_cpu = True


def ran_on(model, processes: int = 1) -> dict:
    """Where a job really ran, read from its loaded model (not from the option asked for): the device and
    dtype of its weights, the accelerator's name, the processes and the PyTorch build. Recorded in each
    command's summary beside the results."""
    first = next(model.parameters())
    record = {"device": str(first.device), "dtype": str(first.dtype).removeprefix("torch."), "processes": processes}
    if first.device.type == "cuda":
        record["accelerator"] = torch.cuda.get_device_name(first.device)
    return {**record, "torch": torch.__version__}


class Processes:
    """This process's place among `accelerate launch` / torchrun processes (one process: rank 0 of 1), and
    the device it computes on: the launcher's accelerator for this rank, or `--device` in one process."""

    def __init__(self, device: str = "auto"):
        from accelerate import PartialState  # imports torch.distributed machinery: only when a job starts

        check_device_name(device)
        wanted = resolve_device(device)
        self.state = PartialState(cpu=wanted.type == "cpu")
        self.rank, self.world = self.state.process_index, self.state.num_processes
        self.main = self.state.is_main_process
        self.local_main = self.state.is_local_main_process
        # Several processes: each takes the accelerator the launcher gave its rank.
        self.device = wanted if wanted.type == "cpu" or self.world == 1 else self.state.device

    def barrier(self) -> None:
        if self.world > 1:
            self.state.wait_for_everyone()


def stream_seed(job: str, stage: str, seed: int, start: int) -> int:
    """The seed of one stage of one chunk of work (e.g. job "rewrite", stage "hinted", the chunk's first row),
    fixed by these alone: a chunk samples the same whether it runs first, after a restart, or in another
    process, and no two stages or chunks share a stream."""
    digest = hashlib.sha256(f"onsft-{job}:{seed}:{stage}:{start}".encode()).digest()
    return int.from_bytes(digest[:7], "big")
