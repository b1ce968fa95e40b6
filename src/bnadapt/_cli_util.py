"""Argument types, the one-line-error parser and progress bars shared by the ``bnadapt`` subcommands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import EXIT_USAGE, USER_ERRORS  # noqa: F401  (re-exported for the subcommands)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other user error
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _severities(text: str) -> tuple[int, ...]:
    values = _int_list(text)
    if any(not 1 <= v <= 5 for v in values):
        raise argparse.ArgumentTypeError(f"expected severities within 1..5, got {text!r}")
    return values


def _int_list(text: str) -> tuple[int, ...]:
    """``"1,2,4"`` or a range ``"0-4"`` -> a tuple of non-negative integers."""
    try:
        if "-" in text:
            lo, hi = (int(t) for t in text.split("-", 1))
            values = tuple(range(lo, hi + 1))
        else:
            values = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,2,4 or a range like 0-4, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative integers like 1,2,4 or 0-4, got {text!r}")
    return values


def _name_list(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _progress_bar(total: int, enabled: bool, unit: str):
    """A tqdm bar on a terminal (and when not disabled), else a no-op with the same update()/close() calls."""
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, dynamic_ncols=True, disable=not enabled or not sys.stderr.isatty())


def _advance(bar, step: int, total: int) -> None:
    """Move a progress bar by ``step``, first adopting ``total`` (known only once the work has started)."""
    if bar.total != total:
        bar.total = total
        bar.refresh()
    bar.update(step)


def _add_option_arg(g) -> None:
    g.add_argument(
        "--opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a method's own option, repeatable (e.g. --opt lr=0.001 for tent; see the methods' docs)",
    )


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, help="cifar10_resnet20/32/44/56/110, torchvision:<name> or timm:<name>")
    g.add_argument("--checkpoint", type=Path, help="state dict to load into --model (.pt/.pth/.th)")
    g.add_argument("--weights", help="torchvision weights enum (e.g. IMAGENET1K_V1), from the local cache only")
    g.add_argument(
        "--trust-checkpoint", action="store_true", help="allow unpickling Python objects (trusted files only)"
    )
