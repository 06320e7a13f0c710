"""Data-parallel meta-batches under ``torchrun``: tasks split across ranks, meta-gradients summed.

``torchrun --standalone --nproc_per_node=N -m maml_runner ...`` starts N copies of the run. Each
copy draws the same meta-batch (``stream.batch(step)`` is a pure function of seed and step), takes
its contiguous share of the tasks, and weights its share's mean loss by ``share / meta_batch_size``
so that the all-reduced (summed) gradient is exactly the single-process mean over all tasks, also
when the meta-batch does not divide evenly. Every rank then takes the same optimiser step, so the
meta-parameters stay identical without being broadcast again. Only rank 0 logs, checkpoints and
evaluates (see ``app.run``).

The process group comes from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``):
gloo on CPU, and on a GPU machine gloo for CPU tensors plus NCCL for CUDA ones, with
``cuda:LOCAL_RANK`` as each rank's device.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from maml_runner.errors import UserError
from maml_runner.maml.functional import Params
from maml_runner.tasks import TaskStream
from maml_runner.trainer import Learner, meta_backward


def launched() -> bool:
    """True inside a process that torchrun started with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env() -> None:
    """Join torchrun's process group (idempotent); pin this rank's GPU when there is one."""
    if not launched() or dist.is_initialized():
        return
    if torch.cuda.is_available():
        # ``device=auto``/``cuda`` then means this rank's own GPU.
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend)


def shutdown() -> None:
    """Leave the process group together: rank 0 evaluates after training while the others are
    done, and a rank that tore gloo down while its peer was still connected sometimes died with
    "terminate called without an active exception" (1 launch in 12-16 on the 2-core CPU)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_lead() -> bool:
    """Rank 0 (or a plain run): the one process that logs, checkpoints and evaluates."""
    return rank() == 0


def shared_run_dir(pattern: str = "outputs/%Y-%m-%d/%H-%M-%S") -> str:
    """Rank 0's run folder name (from its clock, as ``hydra.run.dir`` would be), on every rank."""
    name = [datetime.datetime.now().strftime(pattern) if is_lead() else None]
    dist.broadcast_object_list(name, src=0)
    return name[0]


def share(num_tasks: int, rank: int, world: int) -> tuple[int, int]:
    """``[lo, hi)``: rank's contiguous share of ``num_tasks`` tasks (sizes differ by at most 1)."""
    if world > num_tasks:
        raise UserError(
            f"trainer.meta_batch_size={num_tasks} but torchrun started {world} processes; "
            f"each needs at least one task: use --nproc_per_node <= {num_tasks}"
        )
    base, extra = divmod(num_tasks, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


def broadcast_params(params: Params) -> None:
    """Start every rank from rank 0's θ (same seed gives the same θ; this makes it certain)."""
    with torch.no_grad():
        for p in params.values():
            dist.broadcast(p.data, src=0)


class DistributedStep:
    """``update(step)`` for torchrun: this rank's share of meta-batch ``step``, all-reduced.

    One all-reduce per step carries the flattened meta-gradient, the weighted loss (so every rank
    logs and checks the same full-batch loss) and a stop flag (so an interrupt on any rank stops
    all ranks after the same step). Reading that flag is the one host sync per step.
    """

    def __init__(
        self,
        learner: Learner,
        params: Params,
        optimizer: torch.optim.Optimizer,
        stream: TaskStream,
        tasks_per_pass: int | None = None,
    ) -> None:
        self.learner, self.params, self.optimizer, self.stream = learner, params, optimizer, stream
        self.tasks_per_pass = tasks_per_pass
        self.rank, self.world = rank(), world_size()
        self.lo, self.hi = share(stream.meta_batch_size, self.rank, self.world)
        self.weight = (self.hi - self.lo) / stream.meta_batch_size
        self._stop_requested = False
        self._stop_agreed = False

    def __call__(self, step: int) -> torch.Tensor:
        batch = self.stream.batch(step).tasks(self.lo, self.hi)
        self.optimizer.zero_grad(set_to_none=True)
        loss = meta_backward(self.learner, self.params, batch, self.tasks_per_pass, self.weight)
        # every tensor the optimiser steps: θ and the learner's own meta-parameters
        stepped = [p for group in self.optimizer.param_groups for p in group["params"]]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in stepped]
        flag = loss.new_tensor([1.0 if self._stop_requested else 0.0])
        buffer = torch.cat([g.reshape(-1) for g in grads] + [loss.reshape(1), flag])
        dist.all_reduce(buffer)  # sum: the weights make the gradients' sum the full-batch mean
        offset = 0
        for p, g in zip(stepped, grads):
            g.copy_(buffer[offset : offset + g.numel()].view_as(g))
            p.grad = g
            offset += g.numel()
        self._stop_agreed = bool(buffer[-1] > 0)
        self.optimizer.step()
        return buffer[-2]

    def stop(self, local: bool) -> bool:
        """For ``fit(stop=...)``: request a stop now; True once every rank has seen a request."""
        self._stop_requested |= local
        return self._stop_agreed
