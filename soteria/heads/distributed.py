"""Data-parallel attribution over ``torch.distributed`` (one process per GPU, launched by torchrun).

Every rank holds the whole model (or, in one process, a model split over devices with
accelerate's ``device_map``) and the same prompts; :func:`soteria.attribution.indirect_effects`
gives each rank a deterministic shard of them, all-reduces the results, and every rank returns
the same tensor. Only rank 0 writes files and shows progress bars.

    torchrun --nproc_per_node 8 -m soteria heads meta-llama/Llama-3.1-70B --device cuda --langs en fr hi

Nothing here starts a process group behind the user's back: :func:`init_from_env` joins the
one torchrun describes (``WORLD_SIZE > 1``), with NCCL when CUDA is available, else gloo. A
group the caller initialised is used as is.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch

__all__ = [
    "all_gather_object",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "init_from_env",
    "is_initialized",
    "is_main_process",
    "local_device",
    "rank",
    "resolve",
    "shard",
    "world_size",
]


def _dist():
    import torch.distributed as dist

    return dist


def is_initialized() -> bool:
    """True inside an initialised ``torch.distributed`` process group."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return _dist().get_rank() if is_initialized() else 0


def world_size() -> int:
    """Number of processes in the group (1 outside one)."""
    return _dist().get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0, the one that writes files and shows progress."""
    return rank() == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def local_device() -> torch.device:
    """The device this rank should put its model on: ``cuda:$LOCAL_RANK`` with CUDA, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", _env_int("LOCAL_RANK", 0) % torch.cuda.device_count())
    return torch.device("cpu")


def init_from_env(backend: str | None = None, *, timeout_s: float = 1800.0) -> bool:
    """Join the process group that torchrun (or the same variables set by hand) describes.

    Reads ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. With
    ``WORLD_SIZE`` unset or 1, or a group already initialised, does nothing. ``backend``: default
    ``"nccl"`` when CUDA is available (the current CUDA device becomes ``LOCAL_RANK``), else
    ``"gloo"``. Returns True if this call initialised the group (the caller then owns
    ``torch.distributed.destroy_process_group()``).
    """
    if is_initialized():
        return False
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return False
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise ValueError(
            f"WORLD_SIZE={world} but {', '.join(missing)} not set; launch with torchrun "
            "(torchrun --nproc_per_node N ...) or set RANK, MASTER_ADDR and MASTER_PORT yourself"
        )
    dist = _dist()
    if not dist.is_available():
        raise ValueError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_device())
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def resolve(distributed: bool | None) -> tuple[int, int]:
    """``(rank, world_size)`` to shard work over.

    ``distributed``: None uses the process group when one is initialised, False ignores it
    (this process does all the work), True requires one.
    """
    if distributed is not None and not isinstance(distributed, bool):
        raise ValueError(f"distributed must be True, False or None, got {distributed!r}")
    if distributed is False or (distributed is None and not is_initialized()):
        return 0, 1
    if not is_initialized():
        raise ValueError(
            "distributed=True but torch.distributed is not initialised; launch with torchrun and call "
            "soteria.distributed.init_from_env() (or torch.distributed.init_process_group) first"
        )
    return rank(), world_size()


def shard(n: int, rank: int, world: int) -> range:
    """Indices of ``n`` items that ``rank`` of ``world`` processes takes: ``rank, rank + world, ...``."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    return range(rank, n, world)


def _comm_device() -> torch.device:
    """Where collective tensors must live: the current CUDA device for NCCL, else the CPU."""
    backend = str(_dist().get_backend())
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Sum of ``t`` over all ranks, as a new tensor on ``t``'s device and in ``dtype`` (default ``t``'s).

    The reduction runs in ``dtype`` (pass ``torch.float64`` for sums that should not depend on
    the number of ranks beyond float64 rounding). Outside a process group: a copy of ``t``.
    """
    dtype = dtype or t.dtype
    if not is_initialized():
        return t.detach().to(dtype=dtype, copy=True)
    buf = t.detach().to(device=_comm_device(), dtype=dtype, copy=True).contiguous()
    _dist().all_reduce(buf, op=_dist().ReduceOp.SUM)
    return buf.to(t.device)


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (picklable objects); ``[obj]`` outside a group."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size()
    _dist().all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (picklable); ``obj`` itself outside a group."""
    if not is_initialized():
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Wait for every rank (a no-op outside a group)."""
    if is_initialized():
        if str(_dist().get_backend()) == "nccl":
            _dist().barrier(device_ids=[torch.cuda.current_device()])
        else:
            _dist().barrier()
