"""``bnadapt bench`` over several processes: ``torchrun --nproc-per-node K -m bnadapt bench ...``.

Two ways to split the work (``Dist.shard_cells``):

- cells (default): the (model, stream) work items wait in one queue per model, longest first by an estimated cost
  (:mod:`bnadapt.schedule`); a rank takes the next one when it is ready for it (a counter in the process group's
  store), so no rank waits for another until the queue is empty. Each rank puts its finished rows in the store;
  rank 0 alone writes ``results.jsonl`` (one fsynced append per cell), collecting them after each of its own items
  and at the end.
- ``--shard-cells``: every rank runs every cell on its contiguous block of the cell's images; the correct/total
  counts of each row are summed on rank 0. The n adaptation images (the same seeded draw on every rank) are split
  over the ranks too, for the methods whose statistics come from one :func:`bnadapt.bn.estimate_stats` (their
  :class:`bnadapt.adapt.MethodSpec` says ``shardable``: ``replace``, ``prior`` with ``order=independent``): each BN
  layer normalises and is measured with the moments of all parts, summed in float64 across ranks during the forward
  (the reducer passed to :func:`bnadapt.adapt`), so deeper layers see what one process would. Other
  offline methods adapt on the whole sample on every rank (identical by construction); online methods depend on
  which images share a batch and are refused.

Failures: every rank checks its setup and options before anything is written; a rank whose cell fails marks the
store, the others take no further item, and all stop after rank 0 has written every finished cell
(:class:`RankFailure`). A rank that dies is noticed in the final exchange, which every rank joins when its queue is
empty.
"""

from __future__ import annotations

import datetime
import logging
import os
import pickle
import signal
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist

from .adapt import is_online, method_spec
from .bn import BatchReducer
from .data import ImageSet, IndexedImages
from .errors import USER_ERRORS
from .schedule import longest_first

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_TIMEOUT", "Dist", "RankFailure", "check_shardable", "init_from_env"]

DEFAULT_TIMEOUT = 1800.0  # seconds a rank waits for the others at an exchange (the slowest cell in progress)
_FAILED = "bnadapt/failed"  # set in the store by a rank whose cell failed: the others take no further item
_FAIL_ENV = "BNADAPT_TEST_FAIL_RANK"  # tests only: "K" makes rank K raise after its first cell, "K:exit" exit hard


class RankFailure(Exception):
    """A rank failed or stopped, so every rank stopped; rank 0 wrote the cells finished before.

    ``rank`` is the failed rank (None when unknown: a lost connection or a signal); ``user_error`` is True when it
    failed on a user mistake (exit code 2, else 1).
    """

    def __init__(self, rank: int | None, reason: str, user_error: bool = False) -> None:
        who = f"rank {rank} failed" if rank is not None else "a rank failed or stopped"
        super().__init__(f"{who} ({reason})")
        self.rank, self.user_error = rank, user_error

    @property
    def exit_code(self) -> int:
        return 2 if self.user_error else 1


def check_shardable(methods: Sequence[str]) -> None:
    """Refuse online methods with ``--shard-cells``: their result depends on which images share a batch.

    Example:
        >>> check_shardable(["source", "replace", "prior"])
    """
    online = [m for m in methods if is_online(m)]
    if online:
        raise ValueError(
            f"expected offline methods with --shard-cells, got online {', '.join(online)}: they depend on which "
            "images share a batch; run them without --shard-cells"
        )


class Dist:
    """This process's place in a run: ``rank`` of ``world`` processes, and how the work is split.

    ``Dist()`` is a single process (every exchange is a pass-through); :func:`init_from_env` builds one for a
    torchrun launch after joining the process group.

    Example:
        >>> d = Dist()
        >>> take = d.queue([1.0, 3.0])
        >>> d.rank, d.world, [take(), take(), take()], d.gathered(None, {"x": 1})
        (0, 1, [0, 1, None], None)
    """

    def __init__(self, rank: int = 0, world: int = 1, shard_cells: bool = False, backend: str | None = None) -> None:
        self.rank, self.world, self.shard_cells, self.backend = rank, world, shard_cells, backend
        self._fail = _test_failure(rank)
        self._queues = 0  # queues made so far: every rank makes them in the same order, so the n-th is shared
        self._published = 0  # items this rank has put in the store
        self._seen = [0] * world  # rank 0: items of each rank collected from the store

    # -- start: agree on options and on the plan ------------------------------------------------------------------

    def gathered(self, error: BaseException | None, settings: Any) -> None:
        """Every rank reports its setup error (or None) and its ``settings``; all raise when any failed or differ.

        The failing rank re-raises its own error; the others raise a ValueError naming it, so every rank stops
        before anything is written.
        """
        if self.world == 1:
            if error is not None:
                raise error
            return
        everyone = self._all_gather((_describe(error)[0] if error is not None else None, settings))
        if error is not None:
            raise error
        for k, (err, _) in enumerate(everyone):
            if err is not None:
                raise ValueError(f"expected every rank to start, got rank {k} failing: {err}")
        for k, (_, theirs) in enumerate(everyone):
            if theirs != everyone[0][1]:
                key, a, b = _first_difference(everyone[0][1], theirs)
                raise ValueError(
                    f"expected the same bench options on every rank, got {key}={b!r} on rank {k} but {a!r} on rank 0; "
                    "start every rank with the same command"
                )

    def on_rank0(self, fn: Callable[[], Any], share: Callable[[Any], Any]) -> tuple[Any, Any]:
        """Run ``fn`` on rank 0 only (e.g. open the journal) and give every rank ``share(its result)``.

        Returns (the result on rank 0, None elsewhere; the shared value). An error on rank 0 stops every rank.
        """
        if self.world == 1:
            value = fn()
            return value, share(value)
        value, payload = None, [None]
        if self.rank == 0:
            try:
                value = fn()
                payload = [("ok", share(value))]
            except Exception as e:
                payload = [("error", _describe(e))]
                tdist.broadcast_object_list(payload, src=0)
                raise
        tdist.broadcast_object_list(payload, src=0)
        status, shared = payload[0]
        if status != "ok":
            raise ValueError(f"expected rank 0 to open the results, got: {shared[0]}")
        return value, shared

    # -- the work -------------------------------------------------------------------------------------------------

    def queue(self, costs: Sequence[float]) -> Callable[[], int | None]:
        """A function that gives this rank the position of its next item in a list of items costing ``costs``, or
        None when there is none left (or a rank failed).

        Several ranks without ``shard_cells`` share one queue, longest first (:func:`bnadapt.schedule.longest_first`):
        each item goes to the rank that asks first. A single process, and every rank with ``shard_cells`` (each runs
        a part of every item), get every item in list order. Every rank must make its queues in the same order.
        """
        if self.world == 1 or self.shard_cells:
            items = iter(range(len(costs)))
            return lambda: next(items, None)
        order, key = longest_first(costs), f"bnadapt/queue/{self._queues}"
        self._queues += 1
        store = _store()

        def take() -> int | None:
            if store.check([_FAILED]):
                return None
            n = store.add(key, 1) - 1
            return order[n] if n < len(order) else None

        return take

    def exchange(self, cells: Iterator[tuple[str, Any, list[dict]]], total: int) -> Iterator[tuple[str, Any, list]]:
        """Run this rank's ``cells`` (``(model, cell, rows)`` as they finish) and yield every rank's finished cells on
        rank 0 (nothing elsewhere); ``total`` is the number of planned cells.

        Raises :class:`RankFailure` on every rank when one failed, after yielding what finished before.
        """
        if self.world == 1 and self._fail is None:
            yield from cells
        elif self.shard_cells:
            yield from self._exchange_rounds(cells, total)
        else:
            yield from self._exchange_queued(cells)

    def _exchange_queued(self, cells: Iterator[tuple[str, Any, list[dict]]]) -> Iterator[tuple[str, Any, list]]:
        """Items taken from a shared queue: rows travel through the store as they finish; one exchange at the end."""
        error: BaseException | None = None
        finished = 0
        try:
            for item in cells:
                finished += 1
                if self.rank == 0:
                    yield item
                    yield from self._collect()
                else:
                    self._publish(item)
                if self._fail is not None and finished == 1:
                    self._fail()
        except RankFailure:  # SIGTERM: torchrun is stopping every rank
            raise
        except Exception as e:
            error = e
            if not isinstance(e, USER_ERRORS):
                traceback.print_exc()  # a bug: its traceback, on the rank where it happened
            if self.world > 1:
                _store().set(_FAILED, str(self.rank))
        mine = ("ok", None) if error is None else ("failed", _describe(error), isinstance(error, USER_ERRORS))
        try:
            everyone = self._all_gather(mine) if self.world > 1 else [mine]
        except RuntimeError as e:  # a rank died (connection closed) or hung past the timeout
            if self.rank == 0:
                yield from self._collect(quiet=True)
            raise RankFailure(None, f"lost contact with it: {_describe(e)[0]}") from (error or e)
        if self.rank == 0:
            yield from self._collect()
        failed = [(k, m) for k, m in enumerate(everyone) if m[0] == "failed"]
        if failed:
            k, (_, (reason, _), user) = failed[0]
            raise RankFailure(k, reason, user) from error

    def _publish(self, item: tuple[str, Any, list[dict]]) -> None:
        store = _store()
        store.set(f"bnadapt/rows/{self.rank}/{self._published}", pickle.dumps(item))
        self._published += 1
        store.add(f"bnadapt/done/{self.rank}", 1)  # after the rows: rank 0 reads only what is there

    def _collect(self, quiet: bool = False) -> Iterator[tuple[str, Any, list[dict]]]:
        """Rank 0: the items the other ranks have put in the store since the last call (``quiet``: a store that no
        longer answers gives nothing, as when the rank hosting it died)."""
        if self.world == 1:
            return
        store = _store()
        for r in range(1, self.world):
            try:
                count = store.add(f"bnadapt/done/{r}", 0)
            except RuntimeError:
                if quiet:
                    return
                raise
            while self._seen[r] < count:
                key = f"bnadapt/rows/{r}/{self._seen[r]}"
                item = pickle.loads(store.get(key))
                store.delete_key(key)
                self._seen[r] += 1
                yield item

    def _exchange_rounds(self, cells: Iterator[tuple[str, Any, list[dict]]], total: int) -> Iterator[tuple]:
        """``shard_cells``: every rank runs its part of each cell; rank 0 sums the parts after every cell."""
        finished = 0
        for _ in range(total):
            error: BaseException | None = None
            try:
                if self._fail is not None and finished == 1:
                    self._fail()
                item = next(cells, None)
                finished += item is not None
                mine: tuple = ("ok", item)
            except RankFailure:  # SIGTERM: torchrun is stopping every rank
                raise
            except Exception as e:
                error = e
                mine = ("failed", _describe(e), isinstance(e, USER_ERRORS))
                if not isinstance(e, USER_ERRORS):
                    traceback.print_exc()  # a bug: its traceback, on the rank where it happened
            try:
                everyone = self._all_gather(mine) if self.world > 1 else [mine]
            except RuntimeError as e:  # a rank died (connection closed) or hung past the timeout
                raise RankFailure(None, f"lost contact with it: {_describe(e)[0]}") from (error or e)
            failed = [(k, m) for k, m in enumerate(everyone) if m[0] == "failed"]
            if self.rank == 0 and not failed:  # a sharded cell needs every rank's part
                yield from self._combine([m[1] for m in everyone if m[0] == "ok" and m[1] is not None])
            if failed:
                k, (_, (reason, _), user) = failed[0]
                raise RankFailure(k, reason, user) from error

    def _combine(self, items: list[tuple[str, Any, list[dict]]]) -> Iterator[tuple[str, Any, list[dict]]]:
        if not items:
            return
        # Every rank ran the same cell on its block of images: the counts add up, the time is the slowest part's.
        name, cell, rows = items[0]
        out = [dict(r) for r in rows]
        for _, _, theirs in items[1:]:
            for r, t in zip(out, theirs, strict=True):
                r["correct"] += t["correct"]
                r["correct5"] += t["correct5"]
                r["total"] += t["total"]
                r["seconds"] = max(r["seconds"], t["seconds"])
        for r in out:
            r["accuracy"] = r["correct"] / r["total"] if r["total"] else float("nan")
            r["top5"] = r["correct5"] / r["total"] if r["total"] else float("nan")
        yield name, cell, out

    def shard(self) -> _Shard | None:
        """What ``--shard-cells`` hands the benchmark loop (None otherwise)."""
        return _Shard(self.rank, self.world) if self.shard_cells else None

    def header(self) -> dict:
        """Recorded in the results header (not in the fingerprint: a run may resume with another world size)."""
        if self.world == 1 and not self.shard_cells:
            return {}
        return {"distributed": {"world_size": self.world, "shard_cells": self.shard_cells, "backend": self.backend}}

    def close(self) -> None:
        """Leave the process group (and restore the SIGTERM handler)."""
        if self.world > 1 and tdist.is_initialized():
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            tdist.destroy_process_group()

    def _all_gather(self, obj: Any) -> list:
        out: list = [None] * self.world
        tdist.all_gather_object(out, obj)
        return out


class _Shard:
    """``--shard-cells`` for one rank: its block of each cell's images, and its part of each adaptation sample."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def _block(self, total: int) -> np.ndarray:
        a, b = (round(k * total / self.world) for k in (self.rank, self.rank + 1))
        return np.arange(a, b, dtype=np.int64)  # contiguous: one slice read from a memory-mapped array

    def evaluated(self, images: ImageSet) -> ImageSet:
        """The images of a cell this rank evaluates."""
        if len(images) < self.world:
            raise ValueError(
                f"expected at least {self.world} images per cell with --shard-cells over {self.world} ranks, got "
                f"{len(images)} in {images.name}; use fewer ranks or drop --shard-cells"
            )
        return IndexedImages(images, self._block(len(images)))

    def adaptation(self, method: str, options: dict, indices: np.ndarray) -> tuple[np.ndarray, BatchReducer | None]:
        """This rank's part of a drawn sample and the reducer to adapt with: split when the method is one estimate
        with these options (its spec's ``shardable``) and every rank gets at least 2 images (a layer needs 2 values
        per channel); otherwise the whole sample and no reducer."""
        spec = method_spec(method)
        if not spec.can_shard({**spec.options, **options}) or len(indices) < 2 * self.world:
            return indices, None
        return indices[self._block(len(indices))], _AllReduce()


class _AllReduce:
    """A :class:`bnadapt.bn.BatchReducer` over the default process group, in float64."""

    def moments(self, x: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
        dims = [0, *range(2, x.ndim)]
        x = x.double()
        head = torch.cat([torch.tensor([x.numel() // x.shape[1]], dtype=torch.float64, device=x.device), x.sum(dims)])
        tdist.all_reduce(head)
        count = int(head[0].item())
        mean = head[1:] / max(count, 1)
        # Two passes (sum, then squared deviations from the global mean): no cancellation when |mean| >> std.
        m2 = (x - mean.view(1, -1, *([1] * (x.ndim - 2)))).pow(2).sum(dims)
        tdist.all_reduce(m2)
        return count, mean, m2

    def images(self, count: int) -> int:
        device = "cuda" if tdist.get_backend() == "nccl" else "cpu"
        t = torch.tensor([count], dtype=torch.int64, device=device)
        tdist.all_reduce(t)
        return int(t.item())


def init_from_env(device: str, timeout: float = DEFAULT_TIMEOUT, shard_cells: bool = False) -> tuple[Dist, str]:
    """Join the process group when launched by torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and ``MASTER_ADDR``
    set), else a single process. Returns the :class:`Dist` and the device to use: ``cuda`` becomes
    ``cuda:LOCAL_RANK``. The backend is nccl on CUDA, gloo on the CPU; ``timeout`` (seconds) bounds every wait.

    Example:
        >>> dist, device = init_from_env("cpu")  # not under torchrun
        >>> dist.world, device
        (1, 'cpu')
    """
    if not timeout > 0:
        raise ValueError(f"expected --dist-timeout > 0 seconds, got {timeout}")
    env = os.environ
    if "WORLD_SIZE" not in env or "RANK" not in env:
        return Dist(shard_cells=shard_cells), device
    try:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0"))
    except ValueError:
        raise ValueError(
            f"expected integer RANK, WORLD_SIZE and LOCAL_RANK (as torchrun sets them), got RANK={env['RANK']!r} "
            f"WORLD_SIZE={env['WORLD_SIZE']!r} LOCAL_RANK={env.get('LOCAL_RANK')!r}"
        ) from None
    if world == 1:
        return Dist(shard_cells=shard_cells), device
    if not (0 <= rank < world) or "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
        raise ValueError(
            f"expected 0 <= RANK < WORLD_SIZE with MASTER_ADDR and MASTER_PORT set (launch with torchrun), got "
            f"RANK={rank} WORLD_SIZE={world}; MASTER_ADDR={env.get('MASTER_ADDR')!r}"
        )
    if device == "cuda":
        device = f"cuda:{local}"
    backend = "gloo"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count():
            raise ValueError(
                f"expected a usable --device on rank {rank}, got {device} but this node has "
                f"{torch.cuda.device_count()} CUDA devices; start at most that many processes per node"
            )
        torch.cuda.set_device(dev)
        backend = "nccl"
    try:
        tdist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout))
    except (RuntimeError, ValueError) as e:
        raise ValueError(
            f"expected to join the process group at {env['MASTER_ADDR']}:{env['MASTER_PORT']} as rank {rank} of "
            f"{world}, got: {_describe(e)[0]}"
        ) from None
    # torchrun stops every worker with SIGTERM when one fails: turn it into an exception, so this rank says why
    # and where the finished cells are (a journal append is one write() call, so it is never cut in half).
    signal.signal(signal.SIGTERM, _on_sigterm)
    return Dist(rank, world, shard_cells, backend), device


def _store() -> tdist.Store:
    """The default process group's key-value store (torchrun's, or rank 0's under ``init_method="env://"``)."""
    return tdist.distributed_c10d._get_default_store()


def _on_sigterm(signum: int, frame: Any) -> None:
    raise RankFailure(None, "this rank got SIGTERM, as torchrun stops every rank when one exits")


def _describe(e: BaseException) -> tuple[str, str]:
    text = str(e).strip().splitlines()
    return (f"{type(e).__name__}: {text[0]}" if text else type(e).__name__), type(e).__name__


def _first_difference(a: Any, b: Any, path: str = "") -> tuple[str, Any, Any]:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in dict.fromkeys([*a, *b]):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))
    return path or "options", a, b


def _test_failure(rank: int) -> Callable[[], None] | None:
    """The failure a test asked this rank to simulate (``BNADAPT_TEST_FAIL_RANK=K`` or ``K:exit``), if any."""
    want, _, how = os.environ.get(_FAIL_ENV, "").partition(":")
    if not want or int(want) != rank:
        return None

    def fail() -> None:
        if how == "exit":  # a crash: no goodbye to the other ranks
            sys.stderr.flush()
            os._exit(3)
        raise RuntimeError(f"simulated failure of rank {rank} ({_FAIL_ENV})")

    return fail
