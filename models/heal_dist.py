"""Sharded healing: `torchrun --nproc-per-node N -m models.heal ...` (models.heal reads torchrun's RANK, WORLD_SIZE and
LOCAL_RANK; a plain `python -m models.heal` is one process with no process group).

Under torchrun every process joins one process group (NCCL on GPUs, gloo on CPUs), takes GPU LOCAL_RANK, and the
student is sharded with torch FSDP2 (`fully_shard` on each decoder layer, then on the whole model): each process
keeps 1/N of the weights, gradients and AdamW moments; mixed precision on a GPU (MixedPrecisionPolicy: bf16
compute, gradients reduced in float32; float32 on a CPU). The teacher is held whole in each process (bf16 on a GPU),
or sharded the same way with --shard-teacher. Activation checkpointing (`checkpoint_layers`) recomputes each decoder
layer in the backward pass instead of keeping its activations.

The resumable state (`save_state` / `load_state`) is a torch.distributed.checkpoint folder: each process writes its
own shard of the weights and optimizer, the main process a progress.json (step, data position and order, training
seconds, curve); written as checkpoint.tmp and renamed to checkpoint, so an interrupt keeps the previous one. A state
written by N processes loads into any number (torch.distributed.checkpoint reshards).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

STATE = "checkpoint"                      # the complete state, inside the state folder
TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class Ranks:
    """This process's place: rank `rank` of `world` (0 of 1 for a plain process)."""
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """The process that prints, shows progress bars and writes files."""
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """Whether a process group runs (under torchrun, even with one process)."""
        return grouped()


def grouped() -> bool:
    """Whether this process is in a process group."""
    return dist.is_available() and dist.is_initialized()


def launched() -> bool:
    """Whether torchrun started this process (its RANK, WORLD_SIZE and LOCAL_RANK are set)."""
    return all(name in os.environ for name in TORCHRUN)


def launched_world() -> int:
    """How many processes torchrun started (WORLD_SIZE), 1 for a plain process; known before any process group."""
    return int(os.environ["WORLD_SIZE"]) if launched() else 1


def start(device: str) -> tuple[Ranks, torch.device]:
    """(Ranks, device) of this process: under torchrun, join the process group (NCCL on a GPU, gloo on a CPU) and
    take GPU LOCAL_RANK; otherwise the plain process on `device`."""
    wanted = torch.device(device)
    if not launched():
        return Ranks(), wanted
    if wanted.type == "cuda":
        wanted = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(wanted)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if wanted.type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size()), wanted


def stop() -> None:
    """Leave the process group, if one runs."""
    if grouped():
        dist.destroy_process_group()


def all_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum of `value` over the processes (itself without a process group); not differentiable."""
    if not grouped():
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value


def global_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num * N / (den summed over the N processes): averaged over the processes (as FSDP averages gradients) it is
    sum(num) / sum(den), the ratio over the whole batch; num / den in a plain process. `den` takes no gradient."""
    world = dist.get_world_size() if grouped() else 1
    return num * world / all_sum(den)


def my_rows(batch: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """This process's slice of the global batch (the rows split evenly over the processes, in order)."""
    return batch.chunk(ranks.world)[ranks.rank]


def from_main(values: list[float], device: torch.device) -> list[float]:
    """The main process's `values` in every process (clocks differ; decisions taken on them must not)."""
    if not grouped():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.broadcast(tensor, 0)
    return tensor.tolist()


def barrier() -> None:
    """Wait for every process (nothing to wait for in a plain process)."""
    if grouped():
        dist.barrier()


def checkpoint_layers(model) -> None:
    """Recompute each decoder layer in the backward pass instead of keeping its activations (torch.utils.checkpoint,
    non-reentrant; plain forward when no gradient is taken). Module and weight names stay as they are."""
    for layer in model.layers:
        inner = layer.forward
        layer.forward = lambda *args, inner=inner: (checkpoint(inner, *args, use_reentrant=False)
                                                    if torch.is_grad_enabled() else inner(*args))


def shard(model, device: torch.device, bf16: bool) -> None:
    """FSDP2 over every process: each decoder layer one unit, the rest (embeddings, final norm, head) the root's;
    on a GPU with bf16, compute in bf16 and reduce gradients in float32. Also the teacher's cached decode step
    (forward_step) gathers the weights it needs."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if device.type == "cuda" and bf16 else MixedPrecisionPolicy()
    for layer in model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mixed)
    fully_shard(model, mesh=mesh, mp_policy=mixed)
    register_fsdp_forward_method(model, "forward_step")


def is_sharded(model) -> bool:
    """Whether FSDP2 shards the model's weights."""
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def full_weights(model) -> dict[str, torch.Tensor] | None:
    """The whole state dict on the CPU in the main process (gathered from every shard: all processes must call
    this), None in the others; the model's own state dict when it is not sharded."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return weights if dist.get_rank() == 0 else None


def saved_state(folder: Path) -> Path | None:
    """The complete state in the state folder, if any (the previous one when an interrupt came mid-rename)."""
    for name in (STATE, STATE + ".old"):
        if (folder / name / "progress.json").is_file():
            return folder / name
    return None


def save_state(folder: Path, model, optimizer, progress: dict, ranks: Ranks) -> None:
    """Write the weights and optimizer (each process its shard) and `progress` (JSON, main process) to
    folder/checkpoint.tmp, then rename it to folder/checkpoint. All processes must call this."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    weights, moments = get_state_dict(model, optimizer)
    tmp, final, old = folder / f"{STATE}.tmp", folder / STATE, folder / f"{STATE}.old"
    if ranks.main:
        folder.mkdir(exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    dcp.save({"model": weights, "optimizer": moments}, checkpoint_id=tmp, no_dist=not grouped())
    if ranks.main:
        (tmp / "progress.json").write_text(json.dumps(progress))
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    barrier()


def load_state(folder: Path, model, optimizer) -> dict:
    """Load the state saved_state(folder) finds into the model and optimizer (any sharding); returns its progress."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    path = saved_state(folder)
    weights, moments = get_state_dict(model, optimizer)
    state = {"model": weights, "optimizer": moments}
    dcp.load(state, checkpoint_id=path, no_dist=not grouped())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return json.loads((path / "progress.json").read_text())


def remove_state(folder: Path, ranks: Ranks) -> None:
    """Delete the state folder (main process), after every process is done with it."""
    barrier()
    if ranks.main:
        shutil.rmtree(folder, ignore_errors=True)
