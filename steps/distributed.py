"""Data-parallel training: `train --nproc-per-node N` as N processes per machine under torchrun,
each training its share of every batch with DistributedDataParallel.

- launch: the train process asked for more than one process runs torchrun's launcher
  (torch.distributed.run, in this process) on `python -m steps.train` with the same options,
  and waits for the ranks. Restarts are off: when a rank dies torchrun stops the others at
  once, and launch ends with one line naming the rank.
- join: each rank's process group, NCCL on CUDA (one GPU per rank) and gloo on the CPU, with a
  timeout, so that a rank whose peer on another machine is gone fails instead of waiting for ever.
- Shard and ShardedPolicy: every rank draws each batch's order and augmentation parameters from
  the same seeded generator as a single process and keeps its own part, so the data order (and,
  for the tensor policies, each image's augmentation) is the single process's, and a recipe's
  batch_size is the global batch whatever the number of processes.
- DDP averages the gradients across ranks, so a step is the single process's step on the whole
  batch except for BatchNorm: each rank normalises with its own part's statistics (plain
  BatchNorm under DDP, as torchvision's reference scripts train by default), and rank 0's
  running statistics are broadcast to the others at each step.

Rank 0 owns the MLflow run and does all that a single process does (steps.train); the other
ranks only train, and log nothing.
"""

import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from steps.augment import Policy, TensorPolicy
from steps.errors import StepError, first_line

log = logging.getLogger(__name__)

# How long a rank waits for its peers in one collective. It bounds the hang when a rank on
# another machine is lost (on one machine torchrun sees a rank die within its 0.1 s monitor
# interval and stops the others), and must
# exceed the longest legitimate wait: the others wait for rank 0's range test (max_lr 0 and no
# lr_run) and, each epoch, for its test pass and checkpoint.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
# How long the first machine waits for the others to start (torchrun's static rendezvous).
RENDEZVOUS_TIMEOUT_S = 600
# The exit status of a rank that stopped only because a collective failed, i.e. another rank
# is gone: the launcher then names that other rank as the cause.
LOST_PEER_EXIT = 3


class JobFailed(StepError):
    """A rank failed and torchrun stopped the others; `rank` is the one that failed first."""

    def __init__(self, message: str, rank: int) -> None:
        super().__init__(message)
        self.rank = rank


@dataclass(frozen=True)
class Launch:
    """How many processes to run where, as torchrun takes them."""
    nproc_per_node: int  # processes on this machine, one per GPU
    nnodes: int = 1  # machines
    node_rank: int = 0  # this machine's number, 0 to nnodes - 1; machine 0 holds rank 0
    rdzv_endpoint: str = ""  # host:port on machine 0 where the machines meet; one machine: a free local port

    @property
    def world(self) -> int:
        return self.nproc_per_node * self.nnodes

    @property
    def parallel(self) -> bool:
        return self.world > 1


@dataclass(frozen=True)
class Shard:
    """A process's part of every batch: the rank-th of `world` equal slices."""
    rank: int
    world: int

    def part(self, n: int) -> slice:
        return slice(n * self.rank // self.world, n * (self.rank + 1) // self.world)


@dataclass(frozen=True)
class Group:
    """This process's place in a data-parallel training (join builds it)."""
    rank: int  # 0 to world - 1; rank 0 logs
    world: int
    local_rank: int  # its number on this machine, which picks its GPU
    device: str  # what it trains on: cuda:<local_rank>, or cpu

    @property
    def lead(self) -> bool:
        return self.rank == 0

    @property
    def shard(self) -> Shard:
        return Shard(self.rank, self.world)


def is_worker() -> bool:
    """Whether this process is one of torchrun's ranks (torchrun sets these for each)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def check_launch(launch: Launch, batch_size: int, time_budget: float = 0.0) -> None:
    """Refuse, before any process starts, what torchrun or the batches could not take."""
    if launch.nproc_per_node < 1 or launch.nnodes < 1 or not 0 <= launch.node_rank < launch.nnodes:
        raise StepError(f"need nproc_per_node >= 1, nnodes >= 1 and 0 <= node_rank < nnodes; got {launch}")
    if launch.nnodes > 1 and not launch.rdzv_endpoint.rpartition(":")[2].isdigit():
        raise StepError(f"several machines meet at rdzv_endpoint, host:port of machine 0; got {launch.rdzv_endpoint!r}")
    if batch_size % launch.world:
        raise StepError(f"batch_size {batch_size} does not split into {launch.world} equal parts, one per process; "
                        f"give a multiple of {launch.world}")
    if time_budget and launch.parallel:
        # The budget's pace is timed by one process alone (steps.budget); ranks would have to time it together.
        raise StepError("a time budget is for one process; give epochs with nproc_per_node > 1")


def check_batches(images: int, batch_size: int) -> None:
    """Each process trains its part of whole batches, so there must be one."""
    if images < batch_size:
        raise StepError(f"{images} training images make no whole batch of {batch_size}, which the processes share; "
                        "give a smaller batch_size")


def torchrun_args(launch: Launch, module: str, argv: list[str]) -> list[str]:
    """torchrun's command line for `python -m module argv` on this machine."""
    args = [f"--nproc-per-node={launch.nproc_per_node}", "--max-restarts=0"]
    if launch.nnodes > 1:
        # The static rendezvous numbers the ranks by node_rank, so rank 0, the one that logs,
        # is on machine 0, where the MLflow run was started.
        args += [f"--nnodes={launch.nnodes}", f"--node-rank={launch.node_rank}", "--rdzv-backend=static",
                 f"--rdzv-endpoint={launch.rdzv_endpoint}", f"--rdzv-conf=timeout={RENDEZVOUS_TIMEOUT_S}"]
    else:
        args.append("--standalone")  # a rendezvous on a free local port
    return [*args, "-m", module, *argv]


def launch(launch: Launch, module: str, argv: list[str]) -> None:
    """Run `python -m module argv` as launch.nproc_per_node ranks under torchrun, in this
    process, and wait for them. A failed rank makes torchrun stop the others; this then raises
    JobFailed naming it (its own error, if it had one, is above in the output)."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError

    # torchrun's own lines about a failure (its table, each rank it stopped) say at length what
    # JobFailed's one line says.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    # torchrun would set 1 and warn; on a CPU the cores are shared out instead.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // launch.nproc_per_node)))
    try:
        torchrun.run(torchrun.parse_args(torchrun_args(launch, module, argv)))
    except ChildFailedError as exc:
        rank, line = failure_line(exc.failures)
        raise JobFailed(f"{line}; the other ranks were stopped. Run the same command again to resume from the last "
                        "checkpoint", rank) from None
    except SignalException as exc:  # torchrun has stopped the ranks; it raises once they are gone
        raise StepError(f"stopped by {exc.sigval.name}: the ranks were stopped") from None
    except (RendezvousError, dist.DistError) as exc:  # the static rendezvous times out as a DistStoreError
        raise StepError(f"the ranks did not all meet at {launch.rdzv_endpoint or 'a local port'}: "
                        f"{first_line(exc)}") from None


def failure_line(failures: dict) -> tuple[int, str]:
    """(the rank that caused the failure, a line saying how) from torchrun's failed ranks, a
    rank -> ProcessFailure dict. A rank that stopped on a lost peer (LOST_PEER_EXIT) is an effect,
    so another one is the cause if there is one; else the earliest, the lowest rank on a tie."""
    causes = {r: f for r, f in failures.items() if f.exitcode != LOST_PEER_EXIT} or failures
    rank = min(causes, key=lambda r: (causes[r].timestamp, r))
    failure = causes[rank]
    if failure.exitcode == LOST_PEER_EXIT:
        how = "lost contact with another rank (on another machine?)"
    elif failure.exitcode < 0:
        how = f"was killed by {failure.signal_name()}"
    else:
        how = f"failed with exit code {failure.exitcode}"
    return rank, f"rank {rank} (pid {failure.pid}) {how}"


def lost_peer(exc: BaseException) -> bool:
    """Whether exc is a collective failing because another rank is gone: torch's distributed
    errors (NCCL's among them), and gloo's, which arrive as a plain RuntimeError."""
    return isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and "/gloo/" in str(exc))


def join(device: str) -> Group:
    """This rank's process group: NCCL on its own GPU (local rank n trains on cuda:n) when the
    device is CUDA, gloo on the CPU otherwise. The lead logs which process is which rank."""
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if local >= torch.cuda.device_count():
            raise StepError(f"rank {rank} is process {local + 1} on this machine, which has "
                            f"{torch.cuda.device_count()} CUDA device(s): give nproc_per_node at most that")
        torch.cuda.set_device(local)
    group = Group(rank, world, local, f"cuda:{local}" if cuda else "cpu")
    dist.init_process_group("nccl" if cuda else "gloo", timeout=COLLECTIVE_TIMEOUT,
                            device_id=torch.device(group.device) if cuda else None)
    where = [None] * world
    dist.all_gather_object(where, f"pid {os.getpid()} on {socket.gethostname()} ({group.device})")
    if group.lead:
        log.info("data-parallel training, %d ranks: %s", world, "; ".join(f"rank {r} {w}" for r, w in enumerate(where)))
    return group


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast(obj: object, group: Group) -> object:
    """Rank 0's obj, on every rank (pickled: rank 0's own objects, nothing from outside)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=torch.device(group.device))
    return box[0]


def mean(values: list[float], group: Group) -> list[float]:
    """Each value averaged over the ranks. With equal parts of each batch, the mean of the
    ranks' mean losses is the mean over the whole batches."""
    t = torch.tensor(values, dtype=torch.float64, device=group.device)
    dist.all_reduce(t)
    return (t / group.world).tolist()


def wrap(model: nn.Module, group: Group, trainable_changes: bool) -> DistributedDataParallel:
    """model in DDP, which on construction copies rank 0's weights to all ranks. When the set of
    parameters that train changes during the run (the whitening bias frozen after
    whiten_bias_epochs), DDP must look for the unused ones each step, or it waits for their
    gradients for ever."""
    return DistributedDataParallel(model, device_ids=[group.local_rank] if group.device.startswith("cuda") else None,
                                   find_unused_parameters=trainable_changes)


class ShardedPolicy:
    """A tensor policy for one shard: draws the parameters of the whole batch from the
    generator, as the single process does, so the generator's stream stays the single
    process's (the next epoch's order is drawn from it), and applies this shard's part."""

    on_device = True

    def __init__(self, policy: TensorPolicy, shard: Shard) -> None:
        self.policy = policy
        self.shard = shard
        self.name = policy.name
        self.alternate_flip = policy.alternate_flip

    def reseed(self, seed: int) -> None:
        pass

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, _, h, w = images.shape
        whole = n * self.shard.world
        params = self.policy.draw(whole, h, w, generator)
        return self.policy.apply(images, params[:, self.shard.part(whole)].contiguous())


def sharded(policy: Policy, shard: Shard) -> Policy:
    """The policy as one shard applies it: a tensor policy drawing for the whole batch; a
    CPU-side one as it is (iterate_batches reseeds it per shard); None as None."""
    return ShardedPolicy(policy, shard) if isinstance(policy, TensorPolicy) else policy
