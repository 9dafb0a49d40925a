"""Several processes on one job, through torch.distributed (launched by `torchrun`; no home-made process manager).

`torchrun` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `setup()` joins the process group when
WORLD_SIZE > 1 (gloo for CPU tensors, NCCL for CUDA ones when CUDA is available) and is a no-op in a plain single
process, so every stage runs unchanged without torchrun. Helpers here never pickle: objects travel as JSON bytes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from speechless.core.errors import RuntimeFailure, UsageError


@dataclass(frozen=True)
class Env:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise UsageError(f"environment variable {name}={value!r} is not an integer; launch with torchrun or unset it") from exc


def env() -> Env:
    """This process's place in the job as torchrun announces it (rank 0 of 1 without torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return Env(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    if not 0 <= rank < max(world, 1):
        raise UsageError(f"RANK={rank} is outside WORLD_SIZE={world}; launch with torchrun")
    return Env(rank, world, _env_int("LOCAL_RANK", 0))


def group() -> Env:
    """This process's place in the joined process group; rank 0 of 1 when none was joined (even under torchrun)."""
    return env() if is_distributed() else Env(0, 1, 0)


def setup() -> Env:
    """Join the process group when launched with WORLD_SIZE > 1 (idempotent); return this process's Env."""
    info = env()
    if info.world_size > 1 and not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
    return env()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def local_device(device: torch.device) -> torch.device:
    """A bare `cuda` becomes this process's GPU (`cuda:LOCAL_RANK`) in a multi-process job."""
    if device.type == "cuda" and device.index is None and is_distributed():
        return torch.device("cuda", env().local_rank)
    return device


def broadcast_tensors(tensors: dict[str, torch.Tensor], src: int = 0) -> dict[str, torch.Tensor]:
    """Every rank gets rank `src`'s values (same names and shapes on every rank; done in place, CPU tensors)."""
    if not is_distributed():
        return tensors
    for name in sorted(tensors):
        value = tensors[name]
        carrier = value.to(torch.uint8) if value.dtype == torch.bool else value.contiguous()
        dist.broadcast(carrier, src=src)
        if carrier is not value:
            value.copy_(carrier.to(value.dtype))
    return tensors


def broadcast_json(obj, src: int = 0):
    """Rank `src`'s JSON-serialisable value on every rank."""
    return obj if not is_distributed() else gather_json(obj, to_all=True)[src]


def gather_json(obj, to_all: bool = False) -> list | None:
    """Each rank's JSON-serialisable value, in rank order: on rank 0 (None elsewhere), or on every rank with `to_all`."""
    if not is_distributed():
        return [obj]
    payload = torch.frombuffer(bytearray(json.dumps(obj, ensure_ascii=False).encode()), dtype=torch.uint8)
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([payload.numel()]))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[: payload.numel()] = payload
    buffers = [torch.zeros(longest, dtype=torch.uint8) for _ in sizes]
    dist.all_gather(buffers, padded)
    if not to_all and dist.get_rank() != 0:
        return None
    return [json.loads(b[: int(s.item())].numpy().tobytes().decode()) for b, s in zip(buffers, sizes)]


def check_same(value, what: str) -> None:
    """Refuse to go on when the ranks disagree on `value` (e.g. the sha256 of weights each rank loaded itself)."""
    values = gather_json(value, to_all=True)
    differing = [rank for rank, v in enumerate(values) if v != values[0]]
    if differing:
        raise RuntimeFailure(f"{what} differs between rank 0 ({values[0]}) and rank {differing[0]} ({values[differing[0]]}); "
                             "every rank must read the same files (a filesystem all nodes share, the same revisions)")


def all_reduce_mean(value: float) -> float:
    """Mean of a float over ranks (for logging)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def shard(items: list, info: Env | None = None) -> list:
    """This rank's share of `items`: every world_size-th item from position rank (all items in one process)."""
    info = info or group()
    return items[info.rank::info.world_size]


class _MethodAsForward(torch.nn.Module):
    """DDP averages gradients only for calls through `forward`: route forward to a model's loss method."""

    def __init__(self, model: torch.nn.Module, method: str):
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, *args, **kwargs):
        return getattr(self.model, self.method)(*args, **kwargs)


def data_parallel(model: torch.nn.Module, method: str = "loss", trainable_only: bool = False):
    """`model.<method>` as a callable; in a multi-process job wrapped in DistributedDataParallel, so backward averages
    gradients over ranks (DDP also broadcasts rank 0's parameters once, here). Build it after moving the model.

    `trainable_only` (a large frozen base under a small adapter): DDP leaves the frozen parameters and the buffers
    alone (not broadcast at start, not synchronised; every rank loaded the same weights) and accepts trainable
    parameters that a step leaves unused (a speech-only adapter on a text-only batch, LoRA on the k/v projections of
    layers that reuse another layer's KV)."""
    if not is_distributed():
        return getattr(model, method)
    device = next(model.parameters()).device
    wrapper = _MethodAsForward(model, method)
    if trainable_only:  # DDP's documented way to leave parameters out (a static method; torch has no public one yet)
        frozen = [n for n, p in wrapper.named_parameters() if not p.requires_grad] + [n for n, _ in wrapper.named_buffers()]
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(wrapper, frozen)
    return torch.nn.parallel.DistributedDataParallel(
        wrapper, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=trainable_only)
