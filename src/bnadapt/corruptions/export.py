"""Writing corrupted datasets in the released CIFAR-10-C and ImageNet-C layouts.

Every output file (CIFAR-C) or cell folder (ImageNet-C) is written under a temporary name and renamed when complete,
so an interrupted run never leaves something that looks finished, and a rerun skips what is complete. A manifest
records the options; a rerun with other options into the same folder is refused rather than mixed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .._io import atomic_path, remove_stale_temporaries, temporary_sibling
from ..data import ImageTooLargeError, list_image_files, open_image, read_images, resize_crop
from . import GROUPS, corrupt

log = logging.getLogger(__name__)

# resize_crop lives in bnadapt.data (the readers resize too) and is still importable from here.
__all__ = ["ExportPlan", "export_corrupted", "resize_crop"]

FORMATS = ("cifar-c", "imagenet-c")
MANIFEST = "bnadapt-corrupt.json"
_CHUNK = 64  # images per corruption call: bounds memory for large images


@dataclass(frozen=True)
class ExportPlan:
    """What to write: source, layout, profile, corruptions, severities, seed, and the ImageNet-C resize switch."""

    source: str
    out: str
    format: str
    profile: str
    corruptions: tuple[str, ...]
    severities: tuple[int, ...]
    seed: int
    resize: bool = True
    skip_bad: bool = False

    def validate(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"expected --format to be one of {', '.join(FORMATS)}, got {self.format!r}")
        unknown = [c for c in self.corruptions if c not in GROUPS["all"]]
        if unknown:
            raise ValueError(f"expected corruption names, one of {', '.join(GROUPS['all'])}; got {unknown[0]!r}")
        bad = [s for s in self.severities if not 1 <= s <= 5]
        if bad or not self.severities:
            raise ValueError(f"expected severities in 1..5, got {list(self.severities)}")
        if self.seed < 0:
            raise ValueError(f"expected a non-negative seed, got {self.seed}")
        if self.skip_bad and self.format == "cifar-c":
            raise ValueError(
                "expected --skip-bad with --format imagenet-c, got it with cifar-c, whose arrays hold every image of "
                "the input in order; fix or remove the unreadable files instead"
            )


def _write_manifest(out: Path, plan: ExportPlan, force: bool) -> None:
    wanted = {k: v for k, v in asdict(plan).items() if k not in ("out", "skip_bad")}
    wanted["corruptions"], wanted["severities"] = list(plan.corruptions), list(plan.severities)
    path = out / MANIFEST
    if path.is_file():
        try:
            have = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            have = None
        same = have is not None and all(have.get(k) == v for k, v in wanted.items() if k not in ("corruptions",))
        if not same and not force:
            raise ValueError(
                f"expected {out} to hold output of the same options, got one made with other options ({path}); "
                "choose another --out or pass --force"
            )
        if have and same:
            # Adding corruptions to a finished folder is fine; the manifest lists all of them.
            wanted["corruptions"] = list(dict.fromkeys([*have.get("corruptions", []), *wanted["corruptions"]]))
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(wanted, indent=2) + "\n")


_SOURCE = None  # the clean set a worker process reads (set once per worker by _run's initializer)
_BLOCK_BYTES = 4 << 20  # images per cifar-c task: large enough to amortise the process hop, small for memory


def _set_source(source) -> None:
    global _SOURCE
    _SOURCE = source


def _cifar_block(args: tuple) -> np.ndarray:
    name, severity, start, stop, profile, seed = args
    x = _SOURCE.get(np.arange(start, stop))
    return corrupt(x, name, severity, profile, seed, start=start)


def _export_cifar(plan: ExportPlan, out: Path, jobs: int, progress: Callable[[int, int], None] | None) -> list[Path]:
    from ..data import open_clean

    try:
        source = open_clean(plan.source)
    except ValueError as e:
        raise ValueError(f"{e}; the cifar-c layout needs labels (an .npz with 'y', or class sub-folders)") from None
    n = len(source)
    first = source.get(np.array([0]))[0]
    if first.shape[-1] != 3:
        raise ValueError(f"expected RGB images for the cifar-c layout, got {first.shape[-1]} channel(s)")
    labels = out / "labels.npy"
    if not labels.is_file():
        with atomic_path(labels) as tmp, open(tmp, "wb") as f:
            np.save(f, np.tile(source.labels, len(plan.severities)))
    todo = [c for c in plan.corruptions if not (out / f"{c}.npy").is_file()]
    done = [out / f"{c}.npy" for c in plan.corruptions if c not in todo]
    total = len(plan.corruptions) * len(plan.severities) * n
    if progress:
        progress(len(done) * len(plan.severities) * n, total)
    # Each corruption's file is streamed block by block, in severity order, so memory stays bounded whatever the
    # dataset size (only an .npz source is held whole, as numpy reads it).
    step = max(_CHUNK, _BLOCK_BYTES // first.nbytes)
    starts = range(0, n, step)
    cells = [(c, s) for c in todo for s in plan.severities]
    tasks = [(c, s, a, min(a + step, n), plan.profile, plan.seed) for c, s in cells for a in starts]
    # One pool for every file, its results consumed in order: the workers never idle between corruptions.
    with contextlib.closing(_run(_cifar_block, tasks, jobs, initializer=_set_source, initargs=(source,))) as blocks:
        for name in todo:
            path = out / f"{name}.npy"
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                shape = (len(plan.severities) * n, *first.shape)
                np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
                for _ in range(len(plan.severities) * len(starts)):
                    block = next(blocks)
                    if block.shape[1:] != first.shape:
                        raise ValueError(
                            f"expected every image of {plan.source} to be {first.shape}, got {block.shape[1:]}"
                        )
                    f.write(np.ascontiguousarray(block).tobytes())
                    if progress:
                        progress(len(block), total)
            done.append(path)
    return done


def _imagenet_cell(args: tuple) -> int:
    items, name, severity, plan, cell = args
    from PIL import Image

    tmp = temporary_sibling(cell, "cell")
    shutil.rmtree(tmp, ignore_errors=True)
    written = 0
    try:
        for s in range(0, len(items), _CHUNK):
            # Images are decoded here, a chunk at a time, so memory stays bounded whatever the dataset size.
            loaded = [(i, cls, stem, _load_for_imagenet(src, plan)) for i, cls, stem, src in items[s : s + _CHUNK]]
            loaded = [item for item in loaded if item[3] is not None]
            if not loaded:
                continue
            x = np.stack([img for *_, img in loaded])
            y = corrupt(x, name, severity, plan.profile, plan.seed, indices=[i for i, *_ in loaded])
            for (_, cls, stem, _), im in zip(loaded, y, strict=True):
                (tmp / cls).mkdir(parents=True, exist_ok=True)
                Image.fromarray(im).save(tmp / cls / f"{stem}.JPEG", quality=85, optimize=True)
                written += 1
        os.replace(tmp, cell)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written


def _load_for_imagenet(src: Path | np.ndarray, plan: ExportPlan) -> np.ndarray | None:
    from PIL import Image

    if isinstance(src, np.ndarray):
        return np.asarray(resize_crop(Image.fromarray(src))) if plan.resize else src
    try:
        with open_image(src) as im:  # a decompression bomb is refused from its header, before decoding
            im = im.convert("RGB")
            return np.asarray(resize_crop(im) if plan.resize else im)
    except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError, ImageTooLargeError a ValueError
        if plan.skip_bad:
            log.warning("skipping unreadable image %s (%s)", src, e)
            return None
        if isinstance(e, ImageTooLargeError):
            raise ImageTooLargeError(f"{e}, or pass --skip-bad to skip such files") from None
        raise ValueError(f"expected a readable image, got {src} ({e}); pass --skip-bad to skip such files") from e


def _imagenet_items(plan: ExportPlan) -> list[tuple[int, str, str, Path | np.ndarray]]:
    """(dataset index, class folder name, file stem, image file or array) for every input image."""
    src = Path(plan.source)
    if src.is_dir():
        root = src.resolve()
        files = list_image_files(root)
        if not files:
            raise ValueError(f"expected image files in class sub-folders of {src}, found none")
        # Class and file names come from the input's own folder and file names, never from file contents, and the
        # walk stays inside the input root, so an output path cannot leave --out.
        rels = [f.relative_to(root) for f in files]
        # (class, path inside the class folder); files directly in the root have no class.
        entries = [(r.parts[0], Path(*r.parts[1:])) if len(r.parts) > 1 else ("unlabeled", r) for r in rels]
        stems = _output_stems(entries)
        return [(i, cls, stem, f) for i, ((cls, _), stem, f) in enumerate(zip(entries, stems, files, strict=True))]
    x, y = read_images(src)
    if x.shape[-1] != 3:
        raise ValueError(f"expected RGB images for the imagenet-c layout, got {x.shape[-1]} channel(s)")
    width = len(str(len(x) - 1))
    return [(i, "unlabeled" if y is None else str(int(y[i])), f"{i:0{width}d}", x[i]) for i in range(len(x))]


def _output_stems(entries: list[tuple[str, Path]]) -> list[str]:
    """The output file stem of each (class, path inside the class folder): the file's own stem, unless another file
    of the class has it too (``a/001.png`` and ``b/001.png``, ``001.png`` and ``001.jpg``); then every one of those
    is named by its whole path inside the class, ``/`` written ``__`` (``a__001.png``), so no image overwrites
    another and the names do not depend on the order of the walk. The layout stays ``<class>/<file>.JPEG``.

    Example:
        >>> _output_stems([("cat", Path("a/001.png")), ("cat", Path("b/001.png")), ("cat", Path("002.png"))])
        ['a__001.png', 'b__001.png', '002']
    """
    stems = [(cls, rel.stem) for cls, rel in entries]
    taken = Counter(stems)
    out = [
        s if taken[(cls, s)] == 1 else "__".join(rel.parts) for (cls, s), (_, rel) in zip(stems, entries, strict=True)
    ]
    seen: dict[tuple[str, str], Path] = {}
    for (cls, rel), stem in zip(entries, out, strict=True):
        other = seen.setdefault((cls, stem), rel)
        if other != rel:  # only contrived names are left (a file literally named a__001.png.png beside a/001.png)
            raise ValueError(
                f"expected input files with distinct output names, got {cls}/{other} and {cls}/{rel}, which would "
                f"both be written as {cls}/{stem}.JPEG; rename one of them"
            )
    return out


def _export_imagenet(plan: ExportPlan, out: Path, jobs: int, progress: Callable[[int, int], None] | None) -> list[Path]:
    items = _imagenet_items(plan)
    cells = [(c, s, out / c / str(s)) for c in plan.corruptions for s in plan.severities]
    done = [cell for _, _, cell in cells if cell.is_dir()]
    total = len(cells) * len(items)
    if progress:
        progress(len(done) * len(items), total)
    tasks = []
    for c, s, cell in cells:
        if not cell.is_dir():
            cell.parent.mkdir(parents=True, exist_ok=True)
            tasks.append((items, c, s, plan, cell))
    for (_, _, _, _, cell), _written in zip(tasks, _run(_imagenet_cell, tasks, jobs), strict=True):
        done.append(cell)
        if progress:
            progress(len(items), total)
    return done


def _run(fn, tasks: list, jobs: int, initializer=None, initargs: tuple = ()):
    """Map ``fn`` over tasks in order, in ``jobs`` worker processes (or inline for one job); ``initializer`` runs
    once per process (inline too) with ``initargs``."""
    if jobs <= 1 or len(tasks) <= 1:
        if initializer is not None:
            initializer(*initargs)
        yield from map(fn, tasks)
        return
    setup = (os.getpid(), initializer, initargs)
    pool = ProcessPoolExecutor(max_workers=jobs, initializer=_worker_init, initargs=setup)
    try:
        yield from pool.map(fn, tasks)
    finally:  # on an error or an interrupt, drop the queued tasks instead of finishing them
        pool.shutdown(wait=True, cancel_futures=True)


def _worker_init(parent: int, initializer, initargs: tuple) -> None:
    # A pool's workers wait for tasks forever: if the main process is killed (kill -9, OOM killer) they would stay
    # behind, holding memory. A watchdog ends a worker once its parent is gone.
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()
    if initializer is not None:
        initializer(*initargs)


def export_corrupted(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    format: str = "cifar-c",
    profile: str = "cifar",
    corruptions: Sequence[str] | None = None,
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    seed: int = 0,
    jobs: int = 1,
    resize: bool = True,
    skip_bad: bool = False,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Corrupt a dataset and write it in the CIFAR-10-C or ImageNet-C layout; returns the finished outputs.

    ``cifar-c``: ``out/<corruption>.npy`` (len(severities) * N, H, W, 3) uint8, severities stacked in blocks of N, and
    ``out/labels.npy``. ``imagenet-c``: ``out/<corruption>/<severity>/<class>/<name>.JPEG`` at quality 85, after
    resize 256 + centre crop 224 unless ``resize=False``. Finished outputs are skipped on a rerun. ``progress`` is
    called as ``progress(images just finished, total images)``, first with the images already done.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> np.savez(d / "in.npz", x=np.zeros((2, 32, 32, 3), np.uint8), y=np.array([0, 1]))
        >>> [p.name for p in export_corrupted(d / "in.npz", d / "out", corruptions=["contrast"], severities=[1])]
        ['contrast.npy']
    """
    names = tuple(corruptions) if corruptions is not None else tuple(GROUPS["all"])
    levels = tuple(int(s) for s in severities)
    plan = ExportPlan(str(source), str(out), format, profile, names, levels, int(seed), resize, skip_bad)
    plan.validate()
    if profile not in ("cifar", "imagenet"):
        raise ValueError(f"expected profile to be one of cifar, imagenet, got {profile!r}")
    if not Path(source).exists():
        raise FileNotFoundError(f"expected an .npz or an image folder at {source}, found nothing there")
    out = Path(out)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"expected an existing parent directory for --out {out}; create {out.parent} first")
    created = not out.exists()
    out.mkdir(exist_ok=True)
    # What a killed run was writing (its process gone) would otherwise stay for good beside the finished outputs.
    for folder in (out, *(out / c for c in names)):
        for stale in remove_stale_temporaries(folder):
            log.info("removed %s, left by an interrupted run", stale)
    try:
        _write_manifest(out, plan, force)
        export = _export_cifar if format == "cifar-c" else _export_imagenet
        return export(plan, out, max(1, int(jobs)), progress)
    except BaseException:
        # A run that failed before finishing any output (an unreadable input, a full disk) must not leave a folder
        # behind, nor a manifest that would refuse the corrected rerun as "made with other options".
        if created and not _finished_any(out):
            shutil.rmtree(out, ignore_errors=True)
        raise


def _finished_any(out: Path) -> bool:
    """Whether ``out`` holds a finished output: a file other than the manifest and the labels (temporaries are gone
    by now)."""
    return any(p.name not in (MANIFEST, "labels.npy") and not p.is_dir() for p in out.rglob("*"))
