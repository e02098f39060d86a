"""The ground floor: where this process sits among the ranks torchrun started, the broadcasts that
keep the ranks in step, and UserError, the project's one kind of expected failure."""
import dataclasses
import os

import torch
import torch.distributed as dist


class UserError(ValueError):
    """Bad input or configuration: the message names the flag, file or value and what to do. run.py
    prints it as one line; any other exception is a bug and keeps its traceback."""


@dataclasses.dataclass(frozen=True)
class Dist:
    """Where this process sits: its rank among `world`, and among the `local_world` ranks of its host."""
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    local_rank: int = 0
    local_world: int = 1

    @property
    def group_name(self) -> str:
        return dist.group.WORLD.group_name


def init_distributed(device: str = "auto") -> Dist:
    """From torchrun's variables (plain `python` is world size 1): NCCL on CUDA, gloo on CPU."""
    env = lambda name, default: int(os.environ.get(name, default))   # noqa: E731
    rank, world = env("RANK", 0), env("WORLD_SIZE", 1)
    local_rank, local_world = env("LOCAL_RANK", 0), env("LOCAL_WORLD_SIZE", world)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if torch.cuda.device_count() < local_rank + 1:
            raise UserError(f"rank {rank} needs GPU {local_rank} but only {torch.cuda.device_count()} "
                            f"are visible; start fewer processes per node, or run on the CPU")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(device)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            dist.init_process_group("nccl", device_id=dev)
        else:
            dist.init_process_group("gloo")
    return Dist(rank, world, dev, local_rank, local_world)


def agree(d: Dist, fn):
    """fn() on every rank, with one outcome everywhere: if it raised UserError or ran out of memory
    on any rank, every rank raises the same UserError (the first failing rank's, named), so that a
    failure on one rank ends the run with one message instead of a hang or the others' tracebacks.
    fn itself must not communicate."""
    out, error = None, None
    try:
        out = fn()
    except UserError as e:
        error = str(e)
    except torch.OutOfMemoryError:
        error = "out of GPU memory; use more GPUs (torchrun --nproc-per-node) or a smaller model"
    errors = [error]
    if d.world > 1:
        errors = [None] * d.world
        dist.all_gather_object(errors, error)
    failed = [(r, e) for r, e in enumerate(errors) if e]
    if failed:
        r, e = failed[0]
        raise UserError(e if all(x == e for x in errors) else f"rank {r}: {e}")
    return out


def broadcast_from_rank0(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Rank 0's t on every rank (sampled tokens: every rank must continue with the same ones)."""
    t = t.contiguous()
    if d.world > 1:
        dist.broadcast(t, src=0)
    return t


def broadcast_object(obj, d: Dist):
    """Rank 0's obj (anything picklable: prompts read from stdin) on every rank."""
    if d.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=d.device if d.device.type == "cuda" else None)
    return box[0]
