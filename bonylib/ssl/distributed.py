"""torch.distributed set-up from torchrun's or SLURM's environment; the same code runs alone.

Under ``torchrun`` the variables RANK, WORLD_SIZE and LOCAL_RANK are set; under ``srun`` without
torchrun, SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID are, and the first host of the job is the
rendezvous. Without either, training runs as a single process (world size 1).
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place in the job."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _slurm_master() -> str:
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "")
    if not nodes:
        return "127.0.0.1"
    try:
        return subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True,
                              check=True).stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return first_host(nodes)


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list, without ``scontrol`` (not on every compute image).

    ``node[01-04,07],gpu[1-2]`` -> ``node01``; ``n[001-004]-ib`` -> ``n001-ib``. Commas inside brackets
    separate ranges, not hosts; each bracket group contributes its first value, zero padding kept.
    (Cutting at the first '[' gave ``node``, a host that does not exist, and the rendezvous hung.)
    """
    depth, end = 0, len(nodelist)
    for i, char in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = i
            break
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], nodelist[:end].strip())


def init_distributed(backend: str | None = None) -> World:
    """Join the process group described by the environment, or return a world of one."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = World(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        world = World(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
        env.setdefault("MASTER_ADDR", _slurm_master())
        env.setdefault("MASTER_PORT", str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 1000))
    else:
        return World()
    if world.size > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"),
                                rank=world.rank, world_size=world.size)
    return world


def all_reduce_max(value: int, device: torch.device) -> int:
    """The largest of an integer over all processes (itself when alone): how ranks agree on a decision."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    tensor = torch.tensor([value], device=device)  # NCCL reduces only tensors on the GPU
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of ``value`` over all processes (itself when alone)."""
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def barrier() -> None:
    """Wait until every process gets here (nothing when alone)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class _GatherRows(torch.autograd.Function):
    """``all_gather`` of equal-sized row blocks whose backward returns each process its rows' gradient summed over
    every process (an all-reduce: gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, rows.contiguous())
        ctx.start, ctx.count = dist.get_rank() * len(rows), len(rows)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.start : ctx.start + ctx.count]


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """The rows of every process, concatenated in rank order, with gradients flowing back to each process's own
    (``rows`` itself when alone).

    For a term of the whole global batch (KoLeo's nearest neighbours, the KDE's density), which every process then
    computes alike: each process's backward gets the gradient of its rows summed over the W identical copies of the
    term, W times the term's own, and DDP's averaging of the parameters' gradients divides it by W again. So two
    processes of n images train as one process of the 2n images."""
    if not (dist.is_available() and dist.is_initialized()):
        return rows
    return _GatherRows.apply(rows)
