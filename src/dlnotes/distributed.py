"""Data-parallel training on PyTorch's own engine: torchrun starts the processes, DDP keeps them in step.

`dlnotes run ID --nproc 2` re-runs the same command under torchrun (`python -m torch.distributed.run`),
which starts 2 worker processes with RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address in their
environment. `--nnodes 2 --node-rank R --rdzv-endpoint HOST:PORT` on each of two machines (or twice on one)
joins them into one job. Inside a recipe, four calls make a training loop data-parallel:

    device = distributed.start(pick_device(cfg.device))  # join the group: gloo on CPU, nccl on CUDA
    model = distributed.wrap(model)     # DistributedDataParallel: backward() averages gradients across ranks
    idx = distributed.shard(idx)        # every rank takes its slice of the same global batch
    distributed.all_sum(totals)         # evaluation: each rank scores a slice, the sums are added up

Every rank draws the same global batch order (it depends on seed and epoch only) and trains on 1/N of each
batch, and DDP averages the gradients, so N processes take the same optimizer steps as one process with the
same global batch. Only rank 0 writes: the run directory, metrics, progress, checkpoints and plots.
Outside torchrun every call here is a no-op, so the same recipe runs alone unchanged.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

T = TypeVar("T")

LAUNCH_FLAGS = ("--nproc", "--nnodes", "--node-rank", "--rdzv-endpoint")
# How long a rank waits in a collective for the others before the job fails (PyTorch's default is 30 minutes).
# The longest legitimate wait is the other ranks waiting while rank 0 alone evaluates.
COLLECTIVE_TIMEOUT_S = int(os.environ.get("DLNOTES_COLLECTIVE_TIMEOUT_S", "600"))


def world_size() -> int:
    """Processes in the job (1 outside torchrun). Read from the environment: valid before the group starts."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Rank 0 is the one that writes files and prints."""
    return rank() == 0


def in_worker() -> bool:
    """True inside a process that torchrun started."""
    return "TORCHELASTIC_RUN_ID" in os.environ or world_size() > 1


def active() -> bool:
    """A process group with more than one rank is running."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def start(device: Any) -> Any:
    """Join the process group when started by torchrun and return this rank's device (cuda:LOCAL_RANK on a
    GPU machine). Outside torchrun: returns `device` unchanged."""
    import torch
    import torch.distributed as dist

    if world_size() == 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    else:
        dist.init_process_group("gloo", timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    return device


def stop(finished: bool = True) -> None:
    """Leave the process group (launch does this after the recipe returns or fails). After a normal end every
    rank first waits for the others: a rank that closed its connections while another still used them made
    gloo abort that process (seen once in CI: "terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if finished and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def wrap(model: Any) -> Any:
    """DistributedDataParallel around `model` in a multi-process run; the model itself otherwise.
    DDP copies rank 0's weights to every rank first, so the replicas start equal."""
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def unwrap(model: Any) -> Any:
    """The plain module inside DDP (`.module`) and torch.compile (`._orig_mod`) wrappers: what checkpoints hold."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def shard(items: Any) -> Any:
    """This rank's contiguous slice of a global batch (a tensor or a list). Slices differ by at most one item."""
    if world_size() == 1:
        return items
    size, me = world_size(), rank()
    n = len(items)
    start, end = n * me // size, n * (me + 1) // size
    return items[start:end]


def all_sum(tensor: Any) -> Any:
    """Sum `tensor` over all ranks, in place and returned (itself outside a multi-process run)."""
    if active():
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any: all ranks must stop at the same step (Ctrl-C)."""
    if not active():
        return flag
    import torch

    return bool(all_sum(torch.tensor([int(flag)], device=_collective_device())).item())


def broadcast(value: Any) -> Any:
    """Rank 0's `value` on every rank: numbers, strings, None, lists, tuples, dicts with string keys, tensors and
    numpy arrays (the run directory's path, evaluation results). It travels as JSON text plus raw tensors, never
    as a pickle: unpickling what another process sends would run whatever code it names."""
    if not active():
        return value
    import torch

    device = _collective_device()
    tensors: list[Any] = []
    text = json.dumps(_encode(value, tensors)) if is_main() else ""
    data = torch.tensor(list(text.encode()), dtype=torch.uint8, device=device)
    size = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    _broadcast_tensor(size)
    if not is_main():
        data = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    _broadcast_tensor(data)
    skeleton = json.loads(bytes(data.cpu().tolist()).decode())
    return _decode(skeleton, _broadcast_tensors(skeleton, tensors, device))


def _encode(value: Any, tensors: list[Any]) -> Any:
    """A JSON-able skeleton of `value`; tensors are replaced by their index, shape and dtype and kept aside."""
    import numpy as np
    import torch

    if isinstance(value, np.ndarray):
        return _encode(torch.from_numpy(value), tensors) | {"numpy": True}
    if isinstance(value, torch.Tensor):
        tensors.append(value.detach())
        return {"tensor": len(tensors) - 1, "shape": list(value.shape), "dtype": str(value.dtype).split(".")[-1]}
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return {"tuple" if isinstance(value, tuple) else "list": [_encode(v, tensors) for v in value]}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"dict": {k: _encode(v, tensors) for k, v in value.items()}}
    raise TypeError(f"distributed.broadcast cannot send a {type(value).__name__}")


def _broadcast_tensors(skeleton: Any, mine: list[Any], device: Any) -> list[Any]:
    """The skeleton's tensors in index order: rank 0 sends its own, the others receive into empty ones."""
    import torch

    specs: list[dict[str, Any]] = []

    def collect(node: Any) -> None:
        if isinstance(node, dict):
            if "tensor" in node:
                specs.append(node)
            for child in node.get("list") or node.get("tuple") or list(node.get("dict", {}).values()):
                collect(child)

    collect(skeleton)
    received = []
    for spec in sorted(specs, key=lambda s: s["tensor"]):
        if is_main():
            tensor = mine[spec["tensor"]].contiguous().to(device)
        else:
            tensor = torch.empty(spec["shape"], dtype=getattr(torch, spec["dtype"]), device=device)
        _broadcast_tensor(tensor)
        received.append(tensor)
    return received


def _decode(node: Any, tensors: list[Any]) -> Any:
    if not isinstance(node, dict):
        return node
    if "tensor" in node:
        tensor = tensors[node["tensor"]]
        return tensor.cpu().numpy() if node.get("numpy") else tensor
    if "list" in node:
        return [_decode(v, tensors) for v in node["list"]]
    if "tuple" in node:
        return tuple(_decode(v, tensors) for v in node["tuple"])
    return {k: _decode(v, tensors) for k, v in node["dict"].items()}


def _broadcast_tensor(tensor: Any) -> None:
    import torch.distributed as dist

    dist.broadcast(tensor, src=0)


def lost_contact(error: BaseException) -> bool:
    """`error` says a collective failed because another rank went away or timed out (not a bug in the recipe)."""
    import torch.distributed as dist

    return isinstance(error, dist.DistError) or (world_size() > 1 and "gloo" in str(error).lower())


def main_rank_only(function: Callable[..., T]) -> Callable[..., T | None]:
    """For functions that write files (checkpoints, plots): they run on rank 0 and do nothing elsewhere."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> T | None:
        return function(*args, **kwargs) if is_main() else None

    return wrapper


def on_main(function: Callable[..., T], *args: Any) -> T:
    """`function(*args)` computed on rank 0 alone and sent to the others (evaluation: the replicas hold the
    same weights, so one process scoring the test set is enough). Pass the plain model, not the DDP wrapper:
    DDP's forward talks to the other ranks, which are not running it."""
    if not active():
        return function(*args)
    return broadcast(function(*args) if is_main() else None)


def replica_difference(model: Any) -> float:
    """Largest absolute difference between any rank's parameters and rank 0's (0.0 when DDP kept the replicas
    identical, as it must); 0.0 outside a multi-process run. Every rank must call it."""
    if not active():
        return 0.0
    import torch
    import torch.distributed as dist

    mine = torch.cat([p.detach().float().flatten() for p in unwrap(model).parameters()])
    reference = mine.clone()
    dist.broadcast(reference, src=0)
    difference = (mine - reference).abs().max().reshape(1)
    dist.all_reduce(difference, op=dist.ReduceOp.MAX)
    return float(difference.item())


def _collective_device() -> Any:
    """Where a small tensor for a collective must live: nccl reduces GPU tensors only, gloo CPU ones."""
    import torch
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
