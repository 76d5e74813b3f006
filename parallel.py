"""Data parallelism under torchrun, apart from the method: one process is one rank, and without
torchrun (no process group) every helper here is the identity, so memr2.py reads as one process.

Each rank rolls out its own conversations; one update averages over every rank's cells. What
crosses ranks: counts and sums (`over_ranks`, `step_size`), pickled objects (`gather_over_ranks`),
gradients (`sum_gradients`, plain DDP; FSDP2 reduces its shards itself), and under FSDP2 the
number of forward passes, which must match on every rank (`even_parts`, `gathered`)."""
import contextlib

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule


def ranks() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def this_rank() -> int:
    return dist.get_rank() if ranks() > 1 else 0


def over_ranks(x: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """x summed (or op-reduced) over the ranks, in place."""
    if ranks() > 1:
        dist.all_reduce(x, op)
    return x


def int_over_ranks(n: int, device, biggest: bool = False) -> int:
    """An int summed over the ranks, or its largest value with biggest=True."""
    return int(over_ranks(torch.tensor(n, device=device), dist.ReduceOp.MAX if biggest else dist.ReduceOp.SUM))


def sharded(model) -> bool:
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gathered(model):
    """FSDP2: the policy's weights gathered whole on every rank for the block, so a rank's forward
    passes (as many as its own rollouts need, unlike its peers') make no collective calls."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in units:
            m.reshard()
            m.set_reshard_after_forward(m is not model, recurse=False)  # FSDP's default: the root keeps its own


def gather_over_ranks(obj) -> list:
    """[rank 0's obj, rank 1's, ...] on every rank (pickled)."""
    if ranks() == 1:
        return [obj]
    out = [None] * ranks()
    dist.all_gather_object(out, obj)
    return out


def step_size(parts: list, device) -> list:
    """[cells, response tokens] of one optimizer step over every world of every rank: the
    denominators of its means. parts: (cells, ...) tuples, a cell a (Cell, advantage) pair."""
    sizes = torch.tensor([[len(mb), sum(len(c.response) for c, _ in mb)] for mb, *_ in parts],
                         dtype=torch.float64, device=device).reshape(-1, 2).sum(0)
    return over_ranks(sizes).tolist()


def even_parts(model, parts: list, device) -> list:
    """FSDP gathers and reduces inside forward and backward, so every rank must run as many of
    them: a rank short of parts gets None for each missing one, to run as a part weighted 0.
    Unsharded, parts come back as they are."""
    if not sharded(model):
        return parts
    return parts + [None] * (int_over_ranks(len(parts), device, biggest=True) - len(parts))


def sum_gradients(model, finite: bool) -> bool:
    """DDP's all-reduce: every rank's gradient becomes the sum over ranks (each rank's loss
    parts are already scaled by their share of the global mini-batch), so every rank takes the
    same step; FSDP has summed each shard in backward. -> whether every rank's loss was finite
    (if not, nothing is summed)."""
    if ranks() == 1:
        return finite
    if over_ranks(torch.tensor(float(not finite), device=next(model.parameters()).device)).item() > 0:
        return False
    works = []
    for p in [] if sharded(model) else model.parameters():
        if p.requires_grad:
            if p.grad is None:  # a rank with no cells in this step adds zeros
                p.grad = torch.zeros_like(p)
            works.append(dist.all_reduce(p.grad, async_op=True))
    for w in works:
        w.wait()
    return True
