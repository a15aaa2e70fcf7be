"""torchrun, as the loops use it: the one place that decides what each rank does.

`ctta.distributed` holds the process group and the raw collectives; this module holds the policy:

- task streams: every rank draws the same global batches and keeps its contiguous shard (`Parallel.batch_rows`);
  `DataParallel`, installed as ``strategy.comm`` at setup, all-reduces the gradients weighted by the shard's share
  of the batch (so a step equals the single-process step on the global batch for any loss that is a batch mean),
  shards statistics passes and sums their results. Strategies never call a collective themselves.
- episodic sample streams: episodes are dealt round-robin to the ranks in rounds and their outputs gathered to
  rank 0, which scores them in stream order; online sample streams depend on their order and run on rank 0 alone.
- evaluation (task streams): the hooks that evaluate (``every_rank = True``: `ctta.hooks.AccuracyMatrix`,
  `ctta.hooks.ZeroShotRetention`) run on every rank; each rank scores whole batches of its share of the positions
  (`evaluation_share`: the batches one process forms, so every prediction is computed on the same batch as in one
  process) and the counts are summed through ``strategy.comm``: the same accuracy matrix as one process. A frozen
  encoder's feature cache (`ctta.cache.FeatureCache`) fills the same way: each rank encodes its share once.
- every other hook and every file lives on rank 0; rank 0 reads a checkpoint and sends it to the others.
Without torchrun every method is the single-process identity.
"""
from __future__ import annotations

import logging
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from ctta import distributed
from ctta.strategy import SingleProcess, Strategy

log = logging.getLogger("ctta")


class DataParallel(SingleProcess):
    """``strategy.comm`` under torchrun: gradient all-reduce weighted by this rank's share of the current batch."""

    def __init__(self) -> None:
        self.weight = 1.0  # this rank's share of the current global batch (set by `Parallel.batch_rows`)

    def shard(self, n: int) -> Tensor:
        return torch.tensor_split(torch.arange(n), distributed.world_size())[distributed.rank()]

    def sum_(self, tensor: Tensor, what: str = "sum") -> Tensor:
        return distributed.all_reduce_sum_(tensor, what)

    def sync_gradients(self, params: list[torch.nn.Parameter], finite: bool) -> bool:
        return distributed.all_reduce_gradients(params, self.weight, finite)


class Parallel:
    """The ranks of one run. ``Parallel()`` outside torchrun is a single process (rank 0 of 1)."""

    def __init__(self) -> None:
        self.active = distributed.is_distributed()
        self.rank, self.size = (distributed.rank(), distributed.world_size()) if self.active else (0, 1)
        self.main = self.rank == 0
        self.idle = False  # a rank with nothing to do (online sample streams run on rank 0 alone)
        self._comm: DataParallel | None = None

    @classmethod
    def for_sample_stream(cls, episodic: bool) -> "Parallel":
        """Episodic streams are dealt to every rank; an online stream carries its state from sample to sample, so
        rank 0 runs it as a single process and the other ranks are idle (and say so)."""
        par = cls()
        if par.active and not episodic:
            if par.main:
                par.active, par.size = False, 1
            else:
                log.warning("rank %d: the sample stream is online (its state carries over between samples), so it "
                            "runs on rank 0 alone; this rank has nothing to do", par.rank)
                par.idle = True
        return par

    # ------------------------------------------------------------------------------------------ task streams
    def install(self, strategy: Strategy) -> None:
        """Put gradient sync and sharded statistics around a set-up strategy (task streams only)."""
        if self.active:
            self._comm = DataParallel()
            strategy.comm = self._comm

    def uninstall(self, strategy: Strategy) -> None:
        if self._comm is not None and strategy.__dict__.get("comm") is self._comm:
            del strategy.comm  # back to the class default: a single process

    def batch_rows(self, n: int) -> Tensor:
        """This rank's rows of a global batch of ``n`` (and the gradient weight `DataParallel` will use)."""
        if not self.active:
            return torch.arange(n)
        rows, weight = distributed.batch_shard(n)
        self._comm.weight = weight
        return rows

    def shard_batches(self, batches: Sequence[Tensor]) -> tuple[list[Tensor], list[float]]:
        """This rank's part of each global batch (dataset positions), for a loader to fetch ahead, and the
        gradient weight of each (set with `set_weight` before its step)."""
        if not self.active:
            return list(batches), [1.0] * len(batches)
        shards = [distributed.batch_shard(len(b)) for b in batches]
        return [b[rows] for b, (rows, _) in zip(batches, shards)], [w for _, w in shards]

    def set_weight(self, weight: float) -> None:
        if self._comm is not None:
            self._comm.weight = weight

    # ------------------------------------------------------------------------------------------ hooks
    def hooks(self, hooks: Sequence[Any]) -> list[Any]:
        """The hooks this rank calls: all of them on rank 0; elsewhere only those that evaluate sharded
        (``every_rank = True``), which never write files and must call the same collectives on every rank."""
        return list(hooks) if self.main else [h for h in hooks if getattr(h, "every_rank", False)]

    # ------------------------------------------------------------------------------------------ agreement, files
    def check_same(self, value: Any, what: str) -> None:
        if self.active:
            distributed.check_same(value, what)

    def from_main(self, obj: Any, what: str) -> Any:
        """Rank 0's ``obj`` on every rank (send CPU tensors)."""
        return distributed.broadcast_object(obj, what) if self.active else obj

    # ------------------------------------------------------------------------------------------ sample streams
    def rounds(self, n: int, per_rank: int) -> Iterator[list[int]]:
        """Deal ``range(n)`` (episodes of a task) in rounds: yields this rank's indices of each round (all of them,
        one at a time, in a single process so that the loop can score and checkpoint after every episode)."""
        if not self.active:
            for i in range(n):
                yield [i]
            return
        step = per_rank * self.size
        for r0 in range(0, n, step):
            yield list(range(r0 + self.rank, min(r0 + step, n), self.size))

    def gather(self, mine: list, what: str) -> list:
        """Every rank's items of a round, on rank 0, sorted by their first element (stream order); [] elsewhere."""
        if not self.active:
            return mine
        parts = distributed.gather_objects(mine, what)
        return sorted((x for part in parts for x in part), key=lambda x: x[0]) if self.main else []


def evaluation_share(sizes: Sequence[int], batch_size: int, comm: Any) -> list[list[Tensor]]:
    """This process's evaluation batches of datasets of ``sizes`` (one list of index tensors per dataset).

    The batches are those one process forms (``batch_size`` consecutive positions from each dataset's start), so a
    prediction never depends on the number of ranks. A batch belongs to the rank whose ``comm.shard`` of all the
    datasets' positions, laid end to end, holds its first position: whole rows of an accuracy matrix are balanced
    by images, not dataset by dataset (ten test sets of one batch each still split five and five). ``comm``: a
    strategy's ``comm`` (`ctta.strategy.SingleProcess`: everything; `DataParallel`: this rank's contiguous part)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    owned = torch.zeros(sum(sizes), dtype=torch.bool)
    owned[comm.shard(len(owned))] = True
    out, base = [], 0
    for n in sizes:
        out.append([torch.arange(s, min(s + batch_size, n)) for s in range(0, n, batch_size) if owned[base + s]])
        base += n
    return out
