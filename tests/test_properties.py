"""Property-based checks (hypothesis) over the dataset readers and ``corrupt``: whatever is on disk or passed in, the
answer is a result that keeps the readers' promises (uint8 (N, H, W, C) images with C = 1 or 3, int64 labels, one per
image) or a one-line user error (:data:`bnadapt.errors.USER_ERRORS`), never another exception.

Generated: ``.npz``/``.npy`` files (any dtype, rank, size, keys; truncated or with a flipped byte), class folders
(nested, odd names, images of every mode and size, damaged, empty, random bytes, decompression-bomb headers, looping
and broken links), ``dataset.txt`` lists (missing, escaping, absolute paths; odd labels and separators; a byte-order
mark; undecodable bytes), CIFAR-C and ImageNet-C layouts (labels, arrays and manifests of any shape or damage, missing
severities), and ``corrupt``'s arguments (any array, name, severity, profile, seed, backend), also through the
``bnadapt corrupt`` command.

The short run is part of the default suite: a few examples per property, derandomized (the same examples every run:
it cannot flip). The long run is marked slow; its budget per property is ``$BNADAPT_PROPERTY_EXAMPLES`` (default
300), its tally printed at the end (``-s``). docs/reliability.md records a long run.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from bnadapt.cli import main
from bnadapt.corruptions import GROUPS, corrupt
from bnadapt.data import Preprocess, list_image_files, open_clean, open_data, read_images
from bnadapt.errors import USER_ERRORS

_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
SHORT = settings(max_examples=6, deadline=None, derandomize=True, database=None, suppress_health_check=_QUIET)
LONG = settings(
    max_examples=int(os.environ.get("BNADAPT_PROPERTY_EXAMPLES", "300")),
    deadline=None,
    database=None,
    suppress_health_check=_QUIET,
)
TALLY: Counter = Counter()  # (property, "result" or the user error's type): what the runs met


def _outcome(prop: str, fn):
    """``fn()``'s result, or the user error it raised (checked to be one non-empty line); anything else propagates."""
    try:
        result = fn()
    except USER_ERRORS as e:
        text = str(e)
        assert text.strip() and "\n" not in text, f"a user error must be one line, got {text!r}"
        TALLY[prop, type(e).__name__] += 1
        return e
    TALLY[prop, "result"] += 1
    return result


def _check_images(x, y=None) -> None:
    assert isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 4 and x.shape[-1] in (1, 3), x
    if y is not None:
        assert y.dtype == np.int64 and y.shape == (len(x),)


def _check_set(images) -> None:
    """An ImageSet: every image readable at once (or a user error), as many labels as images."""
    assert images.labels.dtype == np.int64 and images.labels.ndim == 1
    got = _outcome("read", lambda: images.get(np.arange(len(images))))
    if not isinstance(got, Exception):
        _check_images(got)
        assert len(got) == len(images)


# --- strategies --------------------------------------------------------------------------------------------------

DTYPES = st.sampled_from(["uint8", "int8", "uint16", "int64", "float32", "float64", "bool"])
DIM = st.integers(0, 40)
SHAPES = st.one_of(
    st.tuples(st.integers(0, 3), DIM, DIM, st.integers(0, 4)),  # (N, H, W, C): mostly almost right
    st.tuples(st.integers(1, 3), st.sampled_from([3, 32]), DIM, DIM),  # channels first
    st.lists(st.integers(0, 6), max_size=5).map(tuple),  # any rank
)


@st.composite
def arrays(draw, shapes=SHAPES, dtypes=DTYPES):
    shape, dtype, seed = draw(shapes), draw(dtypes), draw(st.integers(0, 2**16))
    return np.random.default_rng(seed).integers(0, 256, shape).astype(dtype)


# Mostly right, so that the result's promises are checked as often as the refusals.
VALID = st.tuples(st.integers(1, 3), st.sampled_from([32, 33, 40]), st.sampled_from([32, 36]), st.sampled_from([1, 3]))


def images_or_junk():
    return st.one_of(arrays(VALID, st.just("uint8")), arrays(VALID, st.just("uint8")), arrays())


@st.composite
def damage(draw) -> tuple[str, float, int]:
    return draw(st.sampled_from(["none", "none", "cut", "flip"])), draw(st.floats(0, 1)), draw(st.integers(1, 255))


def _damaged(data: bytes, how: tuple[str, float, int]) -> bytes:
    kind, where, xor = how
    at = int(where * max(len(data) - 1, 0))
    if kind == "cut":
        return data[:at]
    if kind == "flip" and data:
        return data[:at] + bytes([data[at] ^ xor]) + data[at + 1 :]
    return data


MODES = st.sampled_from(["RGB", "L", "RGBA", "P", "1", "I;16", "I", "F", "LA", "CMYK", "YCbCr"])
SUFFIXES = st.sampled_from([".png", ".jpg", ".JPEG", ".bmp", ".webp", ".tif", ".txt", ".PNG"])
CONTENTS = st.sampled_from(
    ["image", "image", "image", "image", "image", "damaged", "random", "empty", "bomb", "self-link", "dir"]
)
NAMES = st.one_of(
    st.sampled_from(["0", "1", "7", "cat", "n01440764", "a b", "é", "-1", "00"]),
    st.text("ab12_", min_size=1, max_size=4),
)


@st.composite
def image_bytes(draw, suffix: str) -> bytes:
    mode, w, h = draw(MODES), draw(st.integers(1, 40)), draw(st.integers(1, 40))
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".webp": "WEBP", ".tif": "TIFF"}
    fmt = fmt.get(suffix.lower(), "PNG")
    seed = draw(st.integers(0, 2**16))
    im = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))
    with contextlib.suppress(ValueError, OSError):  # a mode the format cannot hold is saved as RGB
        im = im.convert(mode)
        f = io.BytesIO()
        im.save(f, fmt)
        return f.getvalue()
    f = io.BytesIO()
    im.convert("RGB").save(f, fmt)
    return f.getvalue()


def _png_header(w: int, h: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 8)) + chunk(b"IEND", b"")


@st.composite
def clean_tree(draw) -> list[tuple[str, str, bytes]]:
    """A class folder as readers expect it: <class>/<image>, one size, PNG or JPEG."""
    size = draw(st.sampled_from([(32, 32), (40, 36)]))
    entries = []
    for cls in draw(st.lists(NAMES, min_size=1, max_size=3, unique=True)):
        # Twins share a stem: 0.png beside 0.jpg, or in a sub-folder (sub/0.png).
        names = [f"{k}{draw(st.sampled_from(['.png', '.jpg']))}" for k in range(draw(st.integers(1, 2)))]
        twin = draw(st.sampled_from([None, None, "suffix", "folder"]))
        if twin:
            stem, suffix = names[0].split(".")
            names.append(f"{stem}.{'jpg' if suffix == 'png' else 'png'}" if twin == "suffix" else f"sub/{names[0]}")
        for name in names:
            im = Image.fromarray(np.full((*size[::-1], 3), draw(st.integers(0, 255)), np.uint8))
            f = io.BytesIO()
            im.save(f, "PNG" if name.endswith(".png") else "JPEG")
            entries.append((f"{cls}/{name}", "file", f.getvalue()))
    return entries


@st.composite
def tree(draw, max_files: int = 6) -> list[tuple[str, str, bytes | str]]:
    """(relative path, kind, bytes or link target) of a folder's entries: a clean class folder or none, and odd
    entries: sub-folders, damaged or foreign files, links."""
    entries = draw(clean_tree()) if draw(st.integers(0, 2)) else []
    for _ in range(draw(st.integers(0, max_files if not entries else 1))):
        parts = draw(st.lists(NAMES, min_size=0, max_size=2))
        suffix, content = draw(SUFFIXES), draw(CONTENTS)
        rel = "/".join([*parts, draw(NAMES) + suffix])
        if content in ("image", "damaged"):
            data = draw(image_bytes(suffix))
            entries.append((rel, "file", data if content == "image" else _damaged(data, draw(damage()))))
        elif content == "random":
            entries.append((rel, "file", draw(st.binary(max_size=64))))
        elif content == "empty":
            entries.append((rel, "file", b""))
        elif content == "bomb":
            entries.append((rel, "file", _png_header(20000, 20000)))
        elif content == "self-link":
            entries.append((rel, "link", Path(rel).name))
        else:
            entries.append((rel, "dir", b""))
    if draw(st.integers(0, 3)) == 0:  # a folder link back up: a loop
        entries.append((draw(NAMES) + "/loop", "link", ".."))
    return entries


def _write_tree(root: Path, entries) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for rel, kind, data in entries:
        path = root / rel
        with contextlib.suppress(OSError):  # a path that an earlier entry made a file: skipped
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists() or path.is_symlink():
                continue
            if kind == "file":
                path.write_bytes(data)
            elif kind == "link":
                os.symlink(data, path)
            else:
                path.mkdir()
    return root


LABELS = st.one_of(
    st.integers(0, 12).map(str),
    st.sampled_from(["-1", "1.5", "99999999999999999999999", "\u0663", "", "x", "0x1", " 3 "]),
)


@st.composite
def list_file(draw, files: list[str]) -> bytes:
    """A dataset.txt naming some of ``files``, and paths that do not exist or lead out of the folder."""
    paths = st.one_of(
        st.sampled_from(files or ["none.png"]),
        st.sampled_from(["missing.png", "../out.png", "/etc/x.png", "a\x00b.png", ".", "x/../missing.png"]),
    )
    lines = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["entry", "entry", "entry", "comment", "blank", "junk"]))
        if kind == "entry":
            sep = draw(st.sampled_from([", ", " ", "\t", ",", " , "]))
            lines.append(f"{draw(paths)}{sep}{draw(LABELS)}")
        elif kind == "comment":
            lines.append("# " + draw(st.text(max_size=8)))
        elif kind == "junk":
            lines.append(draw(st.text(max_size=12)))
        else:
            lines.append("")
    data = "\n".join(lines).encode("utf-8", "surrogatepass")
    prefix = draw(st.sampled_from([b"", b"", b"\xef\xbb\xbf", b"\xff\xfe"]))
    return prefix + data


# --- the properties ----------------------------------------------------------------------------------------------


@st.composite
def npz_cases(draw):
    if draw(st.booleans()):  # as it should be (only the sizes vary), so the result's promises get checked too
        x = draw(arrays(VALID, st.just("uint8")))
        return {"x": x, "y": np.arange(len(x)) % 3, "other": False, "suffix": ".npz", "damage": ("none", 0.0, 1)}
    x = draw(st.one_of(images_or_junk(), st.none()))
    return {
        "x": x,
        "y": draw(
            st.one_of(
                st.just(np.arange(len(x)) % 3 if x is not None and x.ndim else None),
                st.none(),
                arrays(st.lists(st.integers(0, 4), max_size=2).map(tuple)),
            )
        ),
        "other": draw(st.booleans()),
        "suffix": draw(st.sampled_from([".npz", ".npz", ".npy", ".NPZ", ".npy.npz"])),
        "damage": draw(damage()),
    }


def check_npz(case) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"data{case['suffix']}"
        f = io.BytesIO()
        if path.suffix.lower() == ".npy":
            np.save(f, case["x"] if case["x"] is not None else np.zeros(0))
        else:
            arrays_ = {k: case[k] for k in ("x", "y") if case[k] is not None}
            np.savez(f, **arrays_, **({"z": np.zeros(2)} if case["other"] else {}))
        path.write_bytes(_damaged(f.getvalue(), case["damage"]))
        got = _outcome("npz", lambda: read_images(path))
        if not isinstance(got, Exception):
            _check_images(*got)
        images = _outcome("npz", lambda: open_clean(path, Preprocess(32, 36)))
        if not isinstance(images, Exception):
            _check_set(images)
            generated = _outcome("npz", lambda: open_data(f"generate:cifar:{path}", ["contrast"], [1]))
            if not isinstance(generated, Exception):
                _check_set(generated.cell("contrast", 1))


@st.composite
def folder_cases(draw):
    entries = draw(tree())
    files = [rel for rel, kind, _ in entries if kind == "file"]
    return {
        "entries": entries,
        "list": draw(st.one_of(st.none(), list_file(files))),
        "size": draw(st.sampled_from([None, 32])),
    }


def check_folder(case) -> None:
    with tempfile.TemporaryDirectory() as d:
        root = _write_tree(Path(d) / "data", case["entries"])
        if case["list"] is not None:
            (root / "dataset.txt").write_bytes(case["list"])
        prep = Preprocess(case["size"], 36) if case["size"] else None
        got = _outcome("folder", lambda: read_images(root, preprocess=prep))
        if not isinstance(got, Exception):
            _check_images(*got)
            assert prep is None or got[0].shape[1:3] == (32, 32)
        images = _outcome("folder", lambda: open_clean(root, prep))
        if not isinstance(images, Exception):
            _check_set(images)
        data = _outcome("folder", lambda: open_data(f"folder:{root}", preprocess=prep))
        if not isinstance(data, Exception):
            _check_set(data.cell("clean", 0))


@st.composite
def cifar_c_cases(draw):
    n = draw(st.integers(1, 3))
    right = st.just((n * 5, 32, 32, 3))
    labels = np.arange(n * 5) % 10
    return {
        "labels": draw(
            st.one_of(
                st.just(labels),
                st.just(labels),
                st.none(),
                arrays(st.one_of(st.just((n * 5,)), SHAPES), st.sampled_from(["int64", "uint8", "float32"])),
            )
        ),
        "files": {
            c: draw(st.one_of(arrays(right, st.just("uint8")), arrays(right, st.just("uint8")), arrays()))
            for c in draw(st.lists(st.sampled_from(["fog", "contrast"]), min_size=1, max_size=2, unique=True))
        },
        "manifest": draw(
            st.sampled_from(
                [None, None, {"severities": [1, 2, 3, 4, 5]}, {"severities": [2]}, {"severities": "x"}, "{"]
            )
        ),
        "ask": draw(st.lists(st.integers(1, 5), min_size=1, max_size=3, unique=True)),
        "partial": draw(st.sampled_from([True, True, False])),
        "damage": draw(damage()) if draw(st.integers(0, 3)) == 0 else ("none", 0.0, 1),
    }


def check_cifar_c(case) -> None:
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        if case["labels"] is not None:
            np.save(root / "labels.npy", case["labels"])
        for name, x in case["files"].items():
            f = io.BytesIO()
            np.save(f, x)
            (root / f"{name}.npy").write_bytes(_damaged(f.getvalue(), case["damage"]))
        manifest = case["manifest"]
        if manifest is not None:
            (root / "bnadapt-corrupt.json").write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
        data = _outcome(
            "cifar-c", lambda: open_data(f"cifar-c:{root}", ["fog", "contrast"], case["ask"], case["partial"])
        )
        if not isinstance(data, Exception):
            for cell in data.cells:
                opened = _outcome("cifar-c", lambda cell=cell: data.cell(*cell))
                if not isinstance(opened, Exception):
                    _check_set(opened)


@st.composite
def imagenet_c_cases(draw):
    cells = draw(
        st.lists(
            st.tuples(st.sampled_from(["fog", "fog", "contrast", "x"]), st.sampled_from(["1", "1", "2", "9", "a"])),
            min_size=1,
            max_size=3,
            unique=True,
        )
    )
    return {
        "cells": {c: draw(tree(max_files=3)) for c in cells},
        "ask": draw(st.sampled_from([[1], [1, 2], [2, 5]])),
        "partial": draw(st.sampled_from([True, True, False])),
    }


def check_imagenet_c(case) -> None:
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        for (c, s), entries in case["cells"].items():
            _write_tree(root / c / s, entries)
        data = _outcome(
            "imagenet-c", lambda: open_data(f"imagenet-c:{root}", ["fog", "contrast"], case["ask"], case["partial"])
        )
        if not isinstance(data, Exception):
            for cell in data.cells:
                opened = _outcome("imagenet-c", lambda cell=cell: data.cell(*cell))
                if not isinstance(opened, Exception):
                    _check_set(opened)


IMAGES = st.one_of(
    arrays(
        st.tuples(st.integers(0, 2), st.integers(28, 48), st.integers(28, 48), st.sampled_from([1, 3])),
        st.just("uint8"),
    ),
    arrays(st.tuples(st.integers(28, 40), st.integers(28, 40), st.sampled_from([1, 3])), st.just("uint8")),  # one image
    arrays(),
)
SEVERITIES = st.one_of(
    st.integers(-1, 7), st.sampled_from([2.0, 2.5, True, None, "3", np.int64(4), np.uint8(3), float("nan"), 10**30])
)


LAYOUTS = st.sampled_from(["contiguous", "contiguous", "flipped", "read-only", "fortran"])


def _laid_out(x: np.ndarray, layout: str) -> np.ndarray:
    if layout == "flipped" and x.ndim >= 2:
        return x[:, ::-1]  # negative strides
    if layout == "read-only":
        x = x.copy()
        x.flags.writeable = False
    return np.asfortranarray(x) if layout == "fortran" else x


@st.composite
def corrupt_cases(draw):
    if draw(
        st.booleans()
    ):  # valid arguments: any corruption, severity, profile, seed, size from 32 px, 1 or 3 channels
        shape = st.tuples(st.integers(1, 2), st.integers(32, 48), st.integers(32, 48), st.sampled_from([1, 3]))
        return {
            "x": draw(st.one_of(arrays(shape, st.just("uint8")), arrays(shape.map(lambda s: s[1:]), st.just("uint8")))),
            "name": draw(st.sampled_from(GROUPS["all"])),
            "severity": draw(st.integers(1, 5)),
            "profile": draw(st.sampled_from(["cifar", "imagenet"])),
            "seed": draw(st.sampled_from([0, 7, 2**40, "legacy", None])),
            "backend": draw(st.sampled_from(["auto", "numpy", "torch"])),
            "tensor": draw(st.booleans()),
            "layout": draw(LAYOUTS),
        }
    return {
        "x": draw(IMAGES),
        "name": draw(st.one_of(st.sampled_from(GROUPS["all"]), st.text(max_size=6))),
        "severity": draw(SEVERITIES),
        "profile": draw(st.sampled_from(["cifar", "imagenet", "ImageNet", ""])),
        "seed": draw(st.sampled_from([0, 7, -1, "legacy", None, 2.5, 2**64, np.int64(5), "7", float("inf")])),
        "backend": draw(st.sampled_from(["auto", "numpy", "torch", "cuda"])),
        "tensor": draw(st.booleans()),
        "layout": draw(LAYOUTS),
    }


def check_corrupt(case) -> None:
    x = _laid_out(case["x"], case["layout"])
    given_x = torch.from_numpy(np.array(x)) if case["tensor"] and x.dtype != bool else x
    args = (case["name"], case["severity"], case["profile"], case["seed"])
    got = _outcome("corrupt", lambda: corrupt(given_x, *args, backend=case["backend"]))
    if not isinstance(got, Exception):
        out = got.numpy() if isinstance(got, torch.Tensor) else got
        assert out.dtype == np.uint8 and out.shape == x.shape
        again = corrupt(np.ascontiguousarray(x), *args, backend=case["backend"])  # any layout: the same bytes
        assert np.array_equal(again.numpy() if isinstance(again, torch.Tensor) else again, out)


@st.composite
def command_cases(draw):
    source = draw(st.sampled_from(["npz", "folder"]))
    return {
        "source": source,
        "npz": draw(npz_cases()) if source == "npz" else None,
        "entries": draw(tree(max_files=4)) if source == "folder" else None,
        "format": draw(st.sampled_from(["cifar-c", "imagenet-c"])),
        "flags": draw(
            st.lists(st.sampled_from(["--skip-bad", "--no-resize", "-j", "--force"]), max_size=3, unique=True)
        ),
        "corruption": draw(st.sampled_from(["contrast", "gaussian_noise", "pixelate", "fog"])),
    }


def check_command(case) -> None:
    with tempfile.TemporaryDirectory() as d:
        if case["source"] == "npz":
            src = Path(d) / "in.npz"
            x = case["npz"]["x"]
            np.savez(
                src,
                **({"x": x} if x is not None else {}),
                **({"y": case["npz"]["y"]} if case["npz"]["y"] is not None else {}),
            )
        else:
            src = _write_tree(Path(d) / "in", case["entries"])
        out = Path(d) / "out"
        flags = [f for flag in case["flags"] for f in ([flag, "2"] if flag == "-j" else [flag])]
        argv = ["corrupt", "--input", str(src), "--out", str(out), "--profile", "cifar", "--format", case["format"]]
        argv += ["--corruptions", case["corruption"], "--severities", "1", "--no-progress", *flags]
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
        TALLY["command", f"exit {code}"] += 1
        assert code in (0, 2), err.getvalue()
        if code == 2:
            lines = [line for line in err.getvalue().splitlines() if line.startswith("bnadapt: error:")]
            assert len(lines) == 1, err.getvalue()
            assert not out.exists(), "a failed run left the --out it created"
        elif "--skip-bad" not in case["flags"]:  # every image was read: every one is written, none overwritten
            n = len(read_images(src)[0]) if case["source"] == "npz" else len(list_image_files(src))
            if case["format"] == "imagenet-c":
                assert len(list(out.rglob("*.JPEG"))) == n
            else:
                assert len(np.load(out / f"{case['corruption']}.npy", mmap_mode="r")) == n


PROPERTIES = {
    "npz": (npz_cases, check_npz),
    "folder": (folder_cases, check_folder),
    "cifar-c": (cifar_c_cases, check_cifar_c),
    "imagenet-c": (imagenet_c_cases, check_imagenet_c),
    "corrupt": (corrupt_cases, check_corrupt),
    "command": (command_cases, check_command),
}


def _run(name: str, budget: settings) -> None:
    strategy, check = PROPERTIES[name]
    budget(given(strategy())(check))()


@pytest.mark.parametrize("name", PROPERTIES)
def test_property_short(one_thread, name):
    _run(name, SHORT)


@pytest.mark.slow
@pytest.mark.parametrize("name", PROPERTIES)
def test_property_long(one_thread, name):
    TALLY.clear()
    _run(name, LONG)
    print(f"\n{name}: " + ", ".join(f"{where} {kind} {n}" for (where, kind), n in sorted(TALLY.items())))
