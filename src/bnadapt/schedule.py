"""Which work item a rank runs next: items ordered longest first by an estimated cost, taken from one queue by
whichever rank is free (list scheduling), and the simulation that compares this with round-robin rounds.

An item's cost is ``images x (variants + the data cost of its cell)``: one forward of one image by one variant is the
unit, and making one image of a cell costs :data:`DATA_COST` of that (the corruption, for ``generate:`` data; one
decode otherwise). Only the order of the estimates matters to the queue, so they need not be exact.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["DATA_COST", "item_cost", "longest_first", "simulate"]

# Milliseconds per 224x224 image of the numpy engine (one process, severities 1-5; docs/results.md, "ours 224x224"),
# divided by their mean over the 19 corruptions: generating an average corruption weighs about one forward.
_MS_PER_IMAGE = {
    "gaussian_noise": 2.32,
    "shot_noise": 7.96,
    "impulse_noise": 1.56,
    "defocus_blur": 2.04,
    "glass_blur": 8.56,
    "motion_blur": 2.84,
    "zoom_blur": 3.40,
    "snow": 4.04,
    "frost": 0.28,
    "fog": 1.68,
    "brightness": 2.64,
    "contrast": 2.12,
    "elastic_transform": 5.68,
    "pixelate": 0.64,
    "jpeg_compression": 0.36,
    "speckle_noise": 2.32,
    "gaussian_blur": 2.84,
    "spatter": 3.20,
    "saturate": 2.96,
}
_MEAN = sum(_MS_PER_IMAGE.values()) / len(_MS_PER_IMAGE)
DATA_COST = {name: round(t / _MEAN, 3) for name, t in _MS_PER_IMAGE.items()}
_READ_COST = 1.0  # a released file decoded, or an image read from a prepared cache or an array (an upper bound)


def item_cost(cells: Sequence[tuple[str, int]], images: Sequence[int], variants: int, generated: bool) -> float:
    """The estimated cost of running ``variants`` over ``cells`` (``images[i]`` images in cell i); ``generated``:
    the cells are corrupted on the fly, so each weighs its corruption's :data:`DATA_COST`.

    Example:
        >>> item_cost([("glass_blur", 3)], [100], 2, True) > item_cost([("frost", 3)], [100], 2, True)
        True
    """
    total = 0.0
    for (corruption, _), n in zip(cells, images, strict=True):
        data = DATA_COST.get(corruption, _READ_COST) if generated else _READ_COST
        total += n * (variants + data)
    return total


def longest_first(costs: Sequence[float]) -> list[int]:
    """Positions of ``costs`` from the largest to the smallest (ties in their given order).

    Example:
        >>> longest_first([1.0, 3.0, 2.0, 3.0])
        [1, 3, 2, 0]
    """
    return sorted(range(len(costs)), key=lambda i: -costs[i])


def simulate(times: Sequence[float], ranks: int, policy: str, costs: Sequence[float] | None = None) -> float:
    """The wall time of running items taking ``times`` on ``ranks`` processes.

    ``policy``: ``"round-robin"``, item i to rank i % ranks, every rank waiting for the others after each round (as
    ranks exchanged rows before); ``"longest-first"``, items in :func:`longest_first` order of ``costs`` (default: the
    true times), each to the first rank that is free. Efficiency is ``sum(times) / (ranks * wall time)``.

    Example:
        >>> simulate([4, 1, 1, 1, 1, 4], 2, "round-robin"), simulate([4, 1, 1, 1, 1, 4], 2, "longest-first")
        (9, 6.0)
    """
    if policy == "round-robin":
        return sum(max(times[a : a + ranks]) for a in range(0, len(times), ranks))
    if policy != "longest-first":
        raise ValueError(f"expected policy round-robin or longest-first, got {policy!r}")
    free = [0.0] * ranks
    for i in longest_first(times if costs is None else costs):
        r = min(range(ranks), key=free.__getitem__)
        free[r] += times[i]
    return max(free)
