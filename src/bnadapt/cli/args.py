"""What several ``bnadapt`` subcommands share: the parser class, argument types, flag groups and progress bars.

Each flag group is defined here once, so that ``bench``, ``sweep``, ``analyze``, ``adapt`` and ``bank build``
spell the same flag the same way. Help texts that differ between subcommands are chosen by a parameter rather
than by a second copy of the group.

Example:
    >>> p = Parser(prog="demo")
    >>> add_seeds_arg(p)
    >>> p.parse_args(["--seeds", "0-2"]).seeds
    (0, 1, 2)
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

from ..errors import EXIT_USAGE

__all__ = [
    "Parser",
    "Progress",
    "add_bench_data_args",
    "add_corrupt_seed_arg",
    "add_device_arg",
    "add_follow_links_arg",
    "add_model_args",
    "add_no_progress_arg",
    "add_option_arg",
    "add_preprocessing_args",
    "add_run_args",
    "add_seeds_arg",
    "clock",
    "device_of",
    "expand_corruptions",
    "int_list",
    "list_flag",
    "made_parents",
    "model_loading",
    "name_list",
    "positive_int",
    "preprocessing_overrides",
    "severities",
]


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line and exit code 2, like every other user error.

    Example:
        >>> Parser(prog="bnadapt").parse_args(["--nope"])  # doctest: +SKIP
        bnadapt: error: unrecognized arguments: --nope
    """

    def error(self, message: str) -> None:
        # argparse prints the whole usage first; a one-line message matches the library's user errors.
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def positive_int(text: str) -> int:
    """Argument type: an integer of at least 1.

    Example:
        >>> positive_int("3")
        3
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def severities(text: str) -> tuple[int, ...]:
    """Argument type: severities within 1..5, as a list or a range.

    Example:
        >>> severities("1,3,5"), severities("2-4")
        ((1, 3, 5), (2, 3, 4))
    """
    values = int_list(text)
    if any(not 1 <= v <= 5 for v in values):
        raise argparse.ArgumentTypeError(f"expected severities within 1..5, got {text!r}")
    return values


def int_list(text: str) -> tuple[int, ...]:
    """Argument type: ``"1,2,4"``, a range ``"0-4"``, or both (``"0-2,8"``) -> a tuple of non-negative integers.

    Example:
        >>> int_list("1,2,4"), int_list("0-2"), int_list("0-1,8")
        ((1, 2, 4), (0, 1, 2), (0, 1, 8))
    """
    values: list[int] = []
    backwards = False  # 5-1 is a typo, not an empty range
    try:
        for part in (t.strip() for t in text.split(",")):
            lo, sep, hi = part.partition("-")
            if sep and lo:
                backwards |= int(hi) < int(lo)
                values.extend(range(int(lo), int(hi) + 1))
            elif part:
                values.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,2,4 or a range like 0-4, got {text!r}") from None
    if backwards or not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative integers like 1,2,4 or 0-4, got {text!r}")
    return tuple(values)


def name_list(text: str) -> tuple[str, ...]:
    """Argument type: a comma list of names, blanks dropped.

    Example:
        >>> name_list("source, replace,")
        ('source', 'replace')
    """
    return tuple(t.strip() for t in text.split(",") if t.strip())


class _Joined(argparse.Action):
    """Joins the lists that a list flag's words parse to: ``--methods source,replace prior`` -> three names."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, tuple(v for word in values for v in word))


def list_flag(parse: Callable[[str], tuple] = name_list) -> dict:
    """``add_argument`` keywords of a list flag: words separated by spaces, commas or both, each read by ``parse``
    (``name_list``, ``int_list`` with its ranges, ``severities``); every list flag of the CLI takes them.

    Example:
        >>> p = Parser(prog="demo")
        >>> _ = p.add_argument("--methods", **list_flag())
        >>> _ = p.add_argument("--seeds", **list_flag(int_list))
        >>> a = p.parse_args(["--methods", "source,replace", "prior", "--seeds", "0-2", "5"])
        >>> a.methods, a.seeds
        (('source', 'replace', 'prior'), (0, 1, 2, 5))
    """
    return {"nargs": "+", "type": parse, "action": _Joined}


def expand_corruptions(items: Sequence[str] | None) -> list[str]:
    """--corruptions (names or groups such as common; default all 19) as a list of names without repeats.

    Example:
        >>> expand_corruptions(["fog", "weather"])
        ['fog', 'snow', 'frost', 'brightness']
    """
    from ..corruptions import GROUPS

    names: list[str] = []
    for item in items or ["all"]:
        names.extend(GROUPS.get(item, (item,)))
    return list(dict.fromkeys(names))


def clock(seconds: float) -> str:
    """A duration as a clock: minutes:seconds, or hours:minutes:seconds from an hour on.

    Example:
        >>> clock(41), clock(980), clock(3723)
        ('0:41', '16:20', '1:02:03')
    """
    h, rest = divmod(int(round(seconds)), 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """A run's progress on stderr: a tqdm bar on a terminal; elsewhere (nohup, SLURM, CI logs), where a bar would
    show nothing until the end, plain lines such as ``[3/75] r20 fog:3  source 61.2%  elapsed 0:41, ~16:20 left``;
    nothing when ``enabled`` is False (``--no-progress``). ``every`` spaces the plain lines: 0 prints one per update
    (a finished cell), 0.1 one per tenth of the total.

    Example:
        >>> p = Progress(True, "cell")
        >>> p.update(1, 4, "r20 fog:3", {"source": 0.612})  # doctest: +SKIP
        [1/4] r20 fog:3  source 61.2%  elapsed 0:00, ~0:00 left
        >>> p.close()
    """

    def __init__(self, enabled: bool, unit: str, every: float = 0.0) -> None:
        self.done = self.total = 0
        self._steps = round(1 / every) if every > 0 else 0  # lines per total, counted in integers
        self._before = 0  # units an earlier run finished (resumed): shown, but not part of the rate
        self._shown = 0  # the number of ``every`` steps already printed
        self._t0 = time.monotonic()
        self._lines = enabled and not sys.stderr.isatty()
        self._bar = None
        if enabled and not self._lines:
            from tqdm import tqdm

            self._bar = tqdm(total=0, unit=unit, dynamic_ncols=True)

    def skip(self, n: int, total: int) -> None:
        """Count ``n`` units that an earlier run finished (``--resume``): shown as done, not in the estimate."""
        self._before += n
        self._move(self.done + n, total, "", None, show=False)
        if self._steps and total:  # the next line comes at the next tenth (``every``) this run reaches
            self._shown = self.done * self._steps // total

    def advance(self, step: int, total: int, label: str = "", accs: dict[str, float] | None = None) -> None:
        """``step`` more units of ``total`` finished (see :meth:`update`)."""
        self._move(self.done + step, total, label, accs, show=True)

    def update(self, done: int, total: int, label: str = "", accs: dict[str, float] | None = None) -> None:
        """``done`` of ``total`` units finished; ``label`` names the last one and ``accs`` its accuracy per method."""
        self._move(done, total, label, accs, show=True)

    def close(self) -> None:
        """End the bar (a terminal's line stays)."""
        if self._bar is not None:
            self._bar.close()

    def _move(self, done: int, total: int, label: str, accs: dict[str, float] | None, show: bool) -> None:
        step, self.done, self.total = done - self.done, done, total
        shown = [f"{k} {100 * v:.1f}%" for k, v in (accs or {}).items()]
        if self._bar is not None:
            if self._bar.total != total:  # known only once the work has started
                self._bar.total = total
                self._bar.refresh()
            if label:
                self._bar.set_postfix_str(f"{label}: {' '.join(shown[:4])}", refresh=False)
            self._bar.update(step)
        elif self._lines and show and self._due():
            elapsed = time.monotonic() - self._t0
            ran = done - self._before
            left = f"~{clock(elapsed / ran * (total - done))} left" if ran > 0 else "estimating what is left"
            text = "  ".join([label, *shown] if label else shown)
            print(f"[{done}/{total}] {text}  elapsed {clock(elapsed)}, {left}", file=sys.stderr, flush=True)

    def _due(self) -> bool:
        """Whether a plain line is due: always with ``every=0``, else at each new ``every`` fraction and the end."""
        if not self._steps or self.done >= self.total:
            return True
        reached = self.done * self._steps // self.total
        due, self._shown = reached > self._shown, max(self._shown, reached)
        return due


def add_option_arg(g) -> None:
    """``--opt KEY=VALUE`` (repeatable), a method's own option, on a parser or argument group ``g``."""
    g.add_argument(
        "--opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a method's own option, repeatable (e.g. --opt lr=0.001 for tent; see the methods' docs)",
    )


def add_no_progress_arg(g) -> None:
    """``--no-progress``: neither the bar on a terminal nor the plain lines elsewhere (:class:`Progress`)."""
    g.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (on a terminal) or progress lines on stderr (elsewhere, e.g. logs)",
    )


def add_follow_links_arg(p: argparse.ArgumentParser) -> None:
    """``--follow-links``, for the subcommands that read an input folder; added last, so it ends their usage."""
    p.add_argument(
        "--follow-links",
        action="store_true",
        help="read symlinked files and folders that point outside the input folder (skipped by default)",
    )


def add_model_args(p: argparse.ArgumentParser, many: bool = False) -> None:
    """The ``model`` group: --model, --checkpoint, --weights, --trust-checkpoint, --num-classes, --model-dir.

    ``many=True`` (bench, sweep, analyze) takes one or more --model names; ``adapt`` and ``bank build`` take one.
    """
    g = p.add_argument_group("model")
    names = (
        "cifar10_resnet20/32/44/56/110, cifar10_resnet20_augmix, torchvision:<name>, timm:<name>, "
        "robustbench:<dataset>/<name>"
    )
    if many:
        g.add_argument(
            "--model", required=True, **list_flag(), metavar="NAME", help=f"one or more of {names} (spaces or commas)"
        )
        g.add_argument("--checkpoint", type=Path, help="state dict to load into --model (one model only)")
    else:
        g.add_argument("--model", required=True, help=f"one of {names}")
        g.add_argument("--checkpoint", type=Path, help="state dict to load into --model (.pt/.pth/.th)")
    g.add_argument("--weights", help="torchvision weights enum (e.g. IMAGENET1K_V1), from the local cache only")
    trusted = "trusted files" if many else "trusted files only"
    g.add_argument("--trust-checkpoint", action="store_true", help=f"allow unpickling Python objects ({trusted})")
    g.add_argument(
        "--num-classes",
        type=positive_int,
        metavar="K",
        help="classes of the model's head (e.g. a fine-tuned --checkpoint); default: the model's own",
    )
    g.add_argument(
        "--model-dir",
        type=Path,
        default=Path("models"),
        metavar="DIR",
        help="RobustBench's folder: robustbench:<dataset>/<name> is read from DIR/<dataset>/corruptions/<name>.pt "
        "(default: ./models, as RobustBench)",
    )


def model_loading(args: argparse.Namespace) -> dict:
    """The ``model`` group's flags (bar --model) as keywords of :func:`bnadapt.models.load_model`.

    Example:
        >>> p = Parser(prog="demo")
        >>> add_model_args(p)
        >>> model_loading(p.parse_args(["--model", "m", "--num-classes", "5"]))["num_classes"]
        5
    """
    return {
        "checkpoint": args.checkpoint,
        "weights": args.weights,
        "trust_checkpoint": args.trust_checkpoint,
        "num_classes": args.num_classes,
        "model_dir": args.model_dir,
    }


def _number(text: str) -> float:
    """``text`` as a float, NaN when it is not a number (so one range check refuses both)."""
    try:
        return float(text)
    except ValueError:
        return math.nan


def crop_fraction(text: str) -> float:
    """Argument type: timm's ``--crop-pct``, a fraction 0 < F <= 1.

    Example:
        >>> crop_fraction("0.875")
        0.875
    """
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a crop fraction 0 < F <= 1 (e.g. 0.875), got {text!r}")
    return value


def finite_float(text: str) -> float:
    """Argument type: a finite number (no nan or inf).

    Example:
        >>> finite_float("0.5")
        0.5
    """
    value = _number(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """Argument type: a finite number above 0 (a standard deviation).

    Example:
        >>> positive_float("0.25")
        0.25
    """
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


_PREPROCESSING_FLAGS = ("img_size", "crop_pct", "interpolation", "mean", "std")


def add_preprocessing_args(p: argparse.ArgumentParser) -> None:
    """The ``preprocessing`` group (timm's flags): how image files and arrays not of the model's input size are
    resized and centre-cropped, and the normalisation; a flag left out keeps the model's own value.

    Example:
        >>> p = Parser(prog="demo")
        >>> add_preprocessing_args(p)
        >>> preprocessing_overrides(p.parse_args(["--img-size", "160", "--crop-pct", "0.9"]))
        {'img_size': 160, 'crop_pct': 0.9}
    """
    g = p.add_argument_group(
        "preprocessing",
        "image folders and arrays not of the model's input size are resized and centre-cropped to it; by default as "
        "the model says (timm's data config, torchvision weights' transforms, the built-ins' own)",
    )
    g.add_argument("--img-size", type=positive_int, metavar="N", help="input size: images are centre-cropped to NxN")
    g.add_argument(
        "--crop-pct",
        type=crop_fraction,
        metavar="F",
        help="crop fraction 0 < F <= 1: the shorter side is first resized to floor(N / F)",
    )
    g.add_argument("--interpolation", choices=("bilinear", "bicubic", "nearest"), help="resize interpolation")
    g.add_argument(
        "--mean", type=finite_float, nargs=3, metavar=("R", "G", "B"), help="normalisation mean (0..1 scale)"
    )
    g.add_argument(
        "--std", type=positive_float, nargs=3, metavar=("R", "G", "B"), help="normalisation std (0..1 scale)"
    )


def preprocessing_overrides(args: argparse.Namespace) -> dict:
    """The preprocessing flags that were given, as keywords of :func:`bnadapt.models.override_preprocessing`."""
    return {k: getattr(args, k) for k in _PREPROCESSING_FLAGS if getattr(args, k, None) is not None}


def add_bench_data_args(p: argparse.ArgumentParser, default_severities: tuple[int, ...] = (1, 2, 3, 4, 5)) -> None:
    """The ``model``, ``preprocessing`` and ``data`` groups of bench, sweep and analyze; ``--severities`` defaults
    to the given ones."""
    add_model_args(p, many=True)
    add_preprocessing_args(p)
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        required=True,
        help="cifar-c:DIR, imagenet-c:DIR, folder:DIR, npz:FILE or "
        "generate:<cifar|imagenet>:<npz|DIR> (clean images corrupted on the fly)",
    )
    g.add_argument("--clean", type=Path, help="clean .npz or class folder to evaluate too (cifar-c/imagenet-c data)")
    g.add_argument(
        "--corruptions",
        **list_flag(),
        metavar="NAME",
        help="names, or common, extra, all, noise, blur, weather, digital, by spaces or commas (default: all 19)",
    )
    g.add_argument(
        "--severities",
        "--severity",
        dest="severities",
        **list_flag(severities),
        default=default_severities,
        help=f"e.g. 1-5 or 1,3,5 (default: {','.join(map(str, default_severities))})",
    )
    add_corrupt_seed_arg(g)
    g.add_argument("--allow-partial", action="store_true", help="run the cells the data has, skip missing ones")
    g.add_argument(
        "--release-jpeg",
        action="store_true",
        help="generate: JPEG q85 round trip after each corruption, as ImageNet-C's files had",
    )
    g.add_argument(
        "--limit-per-cell",
        type=int,
        metavar="K",
        help="evaluate K images per cell, spread evenly over it (a subset, recorded in the results)",
    )
    g.add_argument(
        "--cache-dir",
        type=Path,
        metavar="DIR",
        help="where generate:'s clean image folder is decoded and resized once for every cell (default: "
        "$BNADAPT_CACHE, else $XDG_CACHE_HOME/bnadapt, else ~/.cache/bnadapt)",
    )
    g.add_argument("--no-cache", action="store_true", help="decode generate:'s clean images again in every cell")


def add_corrupt_seed_arg(g) -> None:
    """``--corrupt-seed``: the seed of ``generate:``'s corruption noise, on a parser or argument group ``g``."""
    g.add_argument(
        "--corrupt-seed",
        type=int,
        default=0,
        help="seed of the corruption noise that generate: data is made with (same seed, same images; default: 0)",
    )


def add_seeds_arg(g) -> None:
    """``--seeds`` (alias ``--seed``): the seeds of the draws, a list or a range, on a parser or group ``g``."""
    g.add_argument(
        "--seeds",
        "--seed",
        dest="seeds",
        **list_flag(int_list),
        default=(0,),
        metavar="S",
        help="seeds of the draws of the n adaptation images from each cell (one adapted model per seed), and of a "
        "method's own randomness (dua's augmentations), e.g. 0,1,2 or 0-4; not the corruption noise, see "
        "--corrupt-seed (default: 0)",
    )


def add_run_args(p: argparse.ArgumentParser) -> None:
    """The ``run`` group of bench, sweep and analyze: batch size, workers, device, precision, decoding."""
    g = p.add_argument_group("run")
    g.add_argument("-b", "--batch-size", type=positive_int, default=256, help="evaluation batch (default: 256)")
    g.add_argument("-j", "--workers", type=int, help="DataLoader workers (default: 0 on cpu, min(8, cores) on cuda)")
    add_device_arg(g)
    g.add_argument(
        "--amp",
        nargs="?",
        const=True,
        default=False,
        choices=("bf16", "fp16"),
        help="autocast evaluation to bf16 or fp16 (bare --amp: bf16 on cpu, fp16 on cuda); BN statistics "
        "are always estimated in float32",
    )
    g.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    g.add_argument(
        "--cpu-decode",
        action="store_true",
        help="on a GPU, still decode JPEGs and run generate:'s corruptions on the CPU workers",
    )


def add_device_arg(g) -> None:
    """``--device``, the same flag and default (:func:`device_of`) in every subcommand that runs a model."""
    g.add_argument("--device", help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda when available, else cpu)")


def device_of(args: argparse.Namespace) -> str:
    """``args.device``, or cuda when a GPU is usable and cpu otherwise (stored back, so it is decided once).

    Example:
        >>> device_of(argparse.Namespace(device="cpu"))
        'cpu'
    """
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args.device


@contextmanager
def made_parents(out: Path | None) -> Iterator[None]:
    """Create the missing folders above ``--out`` (``runs/`` of ``--out runs/r20``) for the block; if the block
    fails, remove those of them it left empty, so a refused command leaves nothing behind.

    Example:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp()) / "runs" / "r20"
        >>> with made_parents(out):
        ...     out.parent.is_dir()
        True
    """
    made: list[Path] = []
    if out is not None:
        for p in reversed(Path(out).absolute().parents):
            if p.is_dir():
                continue
            try:
                p.mkdir()  # a read-only place raises EROFS, which the CLI reports in one line
            except FileExistsError:
                if p.is_dir():  # made by another rank of the same run just now
                    continue
                raise ValueError(
                    f"expected a folder at {p} for --out {out}, got a file; choose another --out"
                ) from None
            made.append(p)
    try:
        yield
    except BaseException:
        for p in reversed(made):
            with suppress(OSError):  # not empty (another rank wrote there): kept
                p.rmdir()
        raise
