"""The evaluation protocols of test-time adaptation: in which order a cell's images reach the model (``--order``) and
which cells one model sees in a row without being reset (``--setting``).

- order ``shuffled`` (default): a seeded random permutation of each cell, as every peer's loader does.
- order ``sorted``: the dataset's own order (class-sorted for ImageNet-C and class folders).
- order ``dirichlet:ALPHA``: RoTTA's / NOTE's label-correlated stream: each class is split over ``K`` slots in
  proportions drawn from Dirichlet(ALPHA), and the slots are played one after the other, each a random sequence of
  its class runs; a small ALPHA gives long runs of one class.
- setting ``reset`` (default): every cell is its own stream, adapted from the source model.
- setting ``continual`` (CoTTA): per severity, one stream through the chosen corruptions in the benchmark's order.
- setting ``gradual`` (CoTTA): one stream; each corruption at severities 1, 2, ..., 5, ..., 2, 1 before the next.
- setting ``mixed``: every chosen cell's images interleaved into one stream (rows are still per cell), the order
  applied to the union (:func:`mixed_order`).

The clean cell, when the data has one, is always a stream of its own.

Example:
    >>> [str(c) for s in plan_streams([Cell("fog", 1), Cell("fog", 2)], "gradual") for c in s]
    ['fog:1', 'fog:2', 'fog:1']
"""

from __future__ import annotations

import zlib

import numpy as np

from .data import Cell

__all__ = ["ORDERS", "SETTINGS", "check_order", "draw_seed", "mixed_order", "plan_streams", "stream_order"]

ORDERS = ("shuffled", "sorted", "dirichlet:ALPHA")
SETTINGS = ("reset", "continual", "gradual", "mixed")
MAX_SLOTS = 100  # RoTTA's cap on the slots of the Dirichlet stream (one per class up to 100 classes)


def check_order(order: str) -> float | None:
    """Validate an ``--order`` value; return ALPHA for ``dirichlet:ALPHA`` (else None).

    Example:
        >>> check_order("dirichlet:0.1"), check_order("shuffled")
        (0.1, None)
    """
    if order in ("shuffled", "sorted"):
        return None
    kind, _, value = order.partition(":")
    try:
        alpha = float(value) if kind == "dirichlet" else None
    except ValueError:
        alpha = None
    if alpha is None or not alpha > 0 or not np.isfinite(alpha):
        raise ValueError(
            f"expected --order shuffled, sorted or dirichlet:ALPHA with ALPHA > 0 (e.g. 0.1), got {order!r}"
        )
    return alpha


def draw_seed(seed: int, cell: Cell | str, purpose: str = "draw") -> int:
    """The seed of one cell's random draw (``purpose``: the adaptation sample, the stream order), made from the run's
    ``seed`` and the cell's name, so that every (seed, cell) draws independently and a row can be redrawn alone.

    Example:
        >>> draw_seed(0, Cell("fog", 3)) == draw_seed(0, Cell("fog", 3)) != draw_seed(0, Cell("fog", 4))
        True
    """
    entropy = [int(seed), zlib.crc32(f"{purpose}:{cell}".encode())]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def stream_order(labels: np.ndarray, order: str, seed: int) -> np.ndarray:
    """The positions of a cell's images in the order they stream (a permutation of ``range(len(labels))``).

    Example:
        >>> stream_order(np.array([0, 0, 1, 1]), "sorted", 0).tolist()
        [0, 1, 2, 3]
        >>> sorted(stream_order(np.array([0, 0, 1, 1]), "dirichlet:0.1", 0).tolist())
        [0, 1, 2, 3]
    """
    alpha = check_order(order)
    labels = np.asarray(labels)
    if order == "sorted":
        return np.arange(len(labels), dtype=np.int64)
    rng = np.random.default_rng(seed)
    if alpha is None:
        return rng.permutation(len(labels)).astype(np.int64)
    classes = np.unique(labels)
    slots = min(len(classes), MAX_SLOTS)
    shares = rng.dirichlet([alpha] * slots, len(classes))  # row c: how class c spreads over the slots
    runs: list[list[np.ndarray]] = [[] for _ in range(slots)]
    for c, share in zip(classes, shares, strict=True):
        members = rng.permutation(np.flatnonzero(labels == c))
        cuts = (np.cumsum(share)[:-1] * len(members)).astype(int)
        for s, part in enumerate(np.split(members, cuts)):
            runs[s].append(part)
    out = [part for slot in runs for k in rng.permutation(len(slot)) for part in (slot[k],)]
    return np.concatenate(out).astype(np.int64)


def mixed_order(labels: list[np.ndarray], order: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``mixed`` stream of several cells: per position, the cell (``origin``) and the image within it (``local``).

    The cells are interleaved at random; ``order`` then acts on the union as on one cell: ``shuffled`` keeps the
    random interleaving, ``sorted`` plays each cell's images in the data's own order (cells still interleaved), and
    ``dirichlet:ALPHA`` makes the union's labels come in runs (each run mixes the cells).

    Example:
        >>> origin, local = mixed_order([np.array([0, 1, 0]), np.array([1, 1])], "sorted", 0)
        >>> sorted(zip(origin.tolist(), local.tolist())) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
        True
        >>> local[origin == 0].tolist()
        [0, 1, 2]
    """
    origin = np.concatenate([np.full(len(y), k, np.int64) for k, y in enumerate(labels)])
    local = np.concatenate([np.arange(len(y), dtype=np.int64) for y in labels])
    perm = np.random.default_rng(seed).permutation(len(origin))
    origin, local = origin[perm], local[perm]
    if order == "sorted":
        for k in range(len(labels)):
            local[origin == k] = np.sort(local[origin == k])
    elif order != "shuffled":
        union = np.concatenate(labels)[perm]
        again = stream_order(union, order, seed)
        origin, local = origin[again], local[again]
    return origin, local


def plan_streams(cells: list[Cell], setting: str) -> list[list[Cell]]:
    """The streams of a run: each a list of cells played in a row without a reset (``mixed``: one stream whose cells'
    images are interleaved). Corruptions keep the order of ``cells`` (the benchmark's).

    Example:
        >>> cells = [Cell("clean", 0), Cell("fog", 5), Cell("snow", 5)]
        >>> [[str(c) for c in s] for s in plan_streams(cells, "continual")]
        [['clean'], ['fog:5', 'snow:5']]
    """
    if setting not in SETTINGS:
        raise ValueError(f"expected --setting to be one of {', '.join(SETTINGS)}, got {setting!r}")
    clean = [[c] for c in cells if c.corruption == "clean"]
    corrupted = [c for c in cells if c.corruption != "clean"]
    if setting == "reset":
        return [[c] for c in cells]
    if setting == "mixed":
        return clean + ([corrupted] if corrupted else [])
    names = list(dict.fromkeys(c.corruption for c in corrupted))
    levels = sorted({c.severity for c in corrupted})
    have = set(corrupted)
    if setting == "continual":
        streams = [[Cell(name, s) for name in names if Cell(name, s) in have] for s in levels]
        return clean + [s for s in streams if s]
    up_down = levels + levels[-2::-1]  # 1, 2, ..., 5, 4, ..., 1
    return clean + [[Cell(name, s) for name in names for s in up_down if Cell(name, s) in have]]
