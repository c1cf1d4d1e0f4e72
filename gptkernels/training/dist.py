"""Processes: rank, world size and device of this one; DistributedDataParallel when torchrun started several."""

from __future__ import annotations

import os

import torch

from gptkernels.training.args import TrainConfigError


class Dist:
    """Rank, world size and device of this process; DDP when torchrun set WORLD_SIZE > 1."""

    def __init__(self):
        env = os.environ
        self.world = int(env.get("WORLD_SIZE", "1")) if "RANK" in env else 1
        self.rank = int(env["RANK"]) if self.world > 1 else 0
        self.local_rank = int(env.get("LOCAL_RANK", "0")) if self.world > 1 else 0
        self.owns_group = False

    @property
    def master(self) -> bool:
        return self.rank == 0

    def init(self, device: torch.device):
        if self.world == 1:
            return
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            self.owns_group = True

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of a scalar tensor over ranks (every rank must call it at the same point)."""
        if self.world == 1:
            return t
        import torch.distributed as dist

        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)  # gloo has no AVG
        return t / self.world

    def close(self):
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def resolve_device(ns, dist: Dist) -> torch.device:
    name = ns.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise TrainConfigError(f"--device {name!r}: {e}") from None
    if device.type not in ("cpu", "cuda"):
        raise TrainConfigError(f"--device {name!r}: the trainer runs on cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainConfigError(f"--device {name!r}: CUDA is not available on this machine")
        if dist.world > 1:
            device = torch.device("cuda", dist.local_rank)
        elif device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device
