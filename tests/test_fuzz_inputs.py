"""Fuzzing of in-memory inputs: ``bnadapt.corrupt`` arguments and the ``bnadapt`` command line.

Every bad input must end in a specific exception (or exit code 2 with one ``bnadapt...: error: expected ...`` line),
never a hang, a raw numpy/torch error or a silently wrong result; good-but-unusual inputs (extreme pixel values,
large non-square images, read-only or strided arrays, tensors) must give uint8 output of the input's shape,
identical for the same seed. Property tests over well-behaved random batches live in test_corruptions_properties.py.
"""

from __future__ import annotations

import contextlib
import io
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bnadapt import corrupt, corruption_names
from bnadapt.cli import USER_ERRORS, main

ALL = corruption_names("all")
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FIXTURES = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


def _image(h: int = 32, w: int = 32, c: int = 3, n: int = 1) -> np.ndarray:
    return np.random.default_rng(h * w + c).integers(0, 256, (n, h, w, c), dtype=np.uint8)


# --- corrupt(): refused inputs -------------------------------------------------------------------------------------


@FAST
@given(
    name=st.sampled_from(ALL),
    dtype=st.sampled_from([np.float32, np.float64, np.int16, np.int64, np.uint16, np.int8, np.bool_]),
    as_tensor=st.booleans(),
)
def test_non_uint8_refused(name, dtype, as_tensor):
    x = _image().astype(dtype)
    if as_tensor:
        x = torch.from_numpy(x)
    with pytest.raises(TypeError, match="expected uint8 images"):
        corrupt(x, name, 3, profile="cifar")


@FAST
@given(
    name=st.sampled_from(ALL),
    shape=st.sampled_from([(1, 32, 32, 2), (1, 32, 32, 4), (32, 32, 5), (32, 32), (1, 3, 32, 32), (2, 1, 32, 32, 3),
                           (32,), ()]),
)  # fmt: skip
def test_bad_channels_or_rank_refused(name, shape):
    with pytest.raises(ValueError, match=r"expected images of shape \(N, H, W, C\)"):
        corrupt(np.zeros(shape, np.uint8), name, 1, profile="imagenet")


@FAST
@given(name=st.sampled_from(ALL), h=st.integers(1, 64), w=st.integers(1, 64), c=st.sampled_from([1, 3]))
def test_too_small_refused(name, h, w, c):
    x = np.zeros((1, h, w, c), np.uint8)
    if h >= 32 and w >= 32:
        assert corrupt(x, name, 1, profile="cifar").shape == x.shape
    else:
        with pytest.raises(ValueError, match="expected images of at least 32x32"):
            corrupt(x, name, 1, profile="cifar")


@FAST
@given(
    name=st.sampled_from(ALL),
    severity=st.one_of(
        st.sampled_from([0, 6, -1, "3", 2.5, 3.0, True, None, np.float64(3)]),
        st.integers().filter(lambda s: not 1 <= s <= 5),
    ),
)
def test_bad_severity_refused(name, severity):
    with pytest.raises(ValueError, match=r"expected severity to be an integer in 1\.\.5"):
        corrupt(_image(), name, severity, profile="cifar")


@FAST
@given(name=st.one_of(st.text(max_size=20), st.sampled_from(["Fog", "fog ", "clean", "all", "common", None, 3])))
def test_unknown_name_refused(name):
    if name in ALL:
        return
    with pytest.raises(ValueError, match="expected a corruption name, one of gaussian_noise"):
        corrupt(_image(), name, 1, profile="cifar")


@FAST
@given(profile=st.one_of(st.text(max_size=10), st.sampled_from(["CIFAR", "ImageNet", None, 1])))
def test_unknown_profile_refused(profile):
    if profile in ("cifar", "imagenet"):
        return
    with pytest.raises(ValueError, match="expected profile to be one of imagenet, cifar"):
        corrupt(_image(), "fog", 1, profile=profile)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"seed": -1}, "expected seed to be a non-negative integer"),
        ({"seed": 1.5}, "expected seed to be a non-negative integer"),
        ({"seed": "x"}, "expected seed to be a non-negative integer"),
        ({"seed": True}, "expected seed to be a non-negative integer"),
        ({"start": -5}, "expected start to be a non-negative integer"),
        ({"start": -5, "seed": "legacy"}, "expected start to be a non-negative integer"),
        ({"start": 1.5}, "expected start to be a non-negative integer"),
        ({"indices": [0, 1]}, "expected one index per image"),
        ({"indices": [-1]}, "expected non-negative image indices"),
    ],
)
def test_bad_seed_start_indices_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        corrupt(_image(), "gaussian_noise", 2, profile="cifar", **kwargs)


# --- corrupt(): unusual but valid inputs ---------------------------------------------------------------------------


def _pattern(kind: str, h: int, w: int, c: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    img = {
        "zeros": np.zeros((h, w)),
        "full": np.full((h, w), 255),
        "checker": ((yy + xx) % 2) * 255,
        "stripes": (xx % 2) * 255,
        "dot": np.pad(np.full((1, 1), 255), ((h // 2, h - h // 2 - 1), (w // 2, w - w // 2 - 1))),
    }[kind]
    return np.repeat(img.astype(np.uint8)[..., None], c, axis=-1)


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kinds=st.lists(st.sampled_from(["zeros", "full", "checker", "stripes", "dot"]), min_size=1, max_size=3),
    c=st.sampled_from([1, 3]),
    severity=st.integers(1, 5),
    profile=st.sampled_from(["cifar", "imagenet"]),
    seed=st.integers(0, 2**32),
)
def test_extreme_pixel_patterns(name, kinds, c, severity, profile, seed):
    x = np.stack([_pattern(k, 32, 40, c) for k in kinds])
    before = x.copy()
    y = corrupt(x, name, severity, profile=profile, seed=seed)
    assert y.shape == x.shape and y.dtype == np.uint8
    assert np.array_equal(x, before)  # the input is never written to
    assert np.array_equal(y, corrupt(x, name, severity, profile=profile, seed=seed))


@pytest.mark.parametrize("name", ALL)
def test_read_only_strided_and_tensor_inputs(name):
    base = _image(36, 44, 3, n=2)
    want = corrupt(np.ascontiguousarray(base[:, ::-1]), name, 4, profile="cifar", seed=3)
    flipped = base[:, ::-1]  # negative strides
    read_only = np.ascontiguousarray(flipped)
    read_only.setflags(write=False)
    for x in (flipped, read_only, np.asfortranarray(flipped)):
        assert np.array_equal(corrupt(x, name, 4, profile="cifar", seed=3), want)
    t = corrupt(torch.from_numpy(np.ascontiguousarray(flipped)), name, 4, profile="cifar", seed=3)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and np.array_equal(t.numpy(), want)


# One corruption per family (the slowest, zoom_blur, is covered at small sizes above).
LARGE = ["shot_noise", "motion_blur", "frost", "elastic_transform", "spatter"]


@pytest.mark.parametrize("name", LARGE)
@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    hw=st.sampled_from([(384, 512), (512, 384), (32, 512), (300, 33), (224, 224)]),
    c=st.sampled_from([1, 3]),
    severity=st.integers(1, 5),
    profile=st.sampled_from(["cifar", "imagenet"]),
)
def test_large_non_square_images(name, hw, c, severity, profile):
    x = _image(*hw, c)
    y = corrupt(x, name, severity, profile=profile, seed=1)
    assert y.shape == x.shape and y.dtype == np.uint8
    assert np.array_equal(y, corrupt(x, name, severity, profile=profile, seed=1))


def test_empty_batch_passes_through():
    y = corrupt(np.zeros((0, 32, 32, 3), np.uint8), "fog", 1, profile="cifar")
    assert y.shape == (0, 32, 32, 3) and y.dtype == np.uint8


# --- the command line ----------------------------------------------------------------------------------------------


def _run(argv: list[str]) -> tuple[int, str]:
    """Exit code and stderr of ``bnadapt argv`` (argparse's own errors raise SystemExit)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


def _assert_usage_error(code: int, err: str, match: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("bnadapt") and ": error: " in lines[0], err
    assert match in lines[0], err


@pytest.fixture
def cli_setup(tmp_path, resnet20_checkpoint):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "in.npz", x=rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8), y=np.arange(40) % 10)
    np.savez(tmp_path / "empty.npz", x=np.zeros((0, 32, 32, 3), np.uint8), y=np.zeros(0, np.int64))
    np.savez(tmp_path / "float.npz", x=np.zeros((4, 32, 32, 3), np.float32), y=np.zeros(4, np.int64))
    (tmp_path / "junk.pt").write_bytes(b"hello, not a checkpoint\n")
    return tmp_path


def _refused(cli_setup, argv: list[str], extra: list[str], match: str) -> None:
    """``argv`` with the ``extra`` flag values (``{p}`` = the setup folder) ends in a one-line usage error."""
    _assert_usage_error(*_run(_with(argv, [e.format(p=cli_setup) for e in extra])), match)


def _with(argv: list[str], extra: list[str]) -> list[str]:
    """``argv`` with each ``--flag value`` of ``extra`` replacing the flag's value, or appended."""
    argv = list(argv)
    for flag, value in zip(extra[::2], extra[1::2], strict=True):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    return argv


def _bench(p, command="bench"):
    return [command, "--model", "cifar10_resnet20", "--checkpoint", str(p / "ck.pt"), "--data",
            f"generate:cifar:{p / 'in.npz'}", "--out", str(p / "o"), "--corruptions", "contrast", "--severities",
            "1", "--n", "4", "--no-progress", "--no-plots"]  # fmt: skip


BENCH_BAD = [
    (["-b", "0"], "positive integer"), (["-b", "-1"], "positive integer"), (["-b", "1.5"], "positive integer"),
    (["-b", "x"], "positive integer"), (["-j", "-1"], "-j >= 0"), (["-j", "x"], "invalid int value"),
    (["--n", "0"], "--n >= 1"), (["--n", "-1"], "non-negative integers"), (["--n", "a"], "expected integers"),
    (["--n", "1-"], "expected integers"), (["--n", "5-1"], "non-negative integers"), (["--n", ""], "non-negative"),
    (["--n", "100"], "lower --n"), (["--seeds", "-1"], "non-negative"), (["--seeds", "x"], "expected integers"),
    (["--seeds", "5-1"], "non-negative integers"), (["--severities", "0"], "within 1..5"),
    (["--severities", "6"], "within 1..5"), (["--severities", "1-"], "expected integers"),
    (["--severities", "a"], "expected integers"), (["--severities", "5-1"], "non-negative integers"),
    (["--severities", "0-3"], "within 1..5"), (["--corruptions", "fogg"], "expected corruption names"),
    (["--methods", "nope"], "--methods"), (["--methods", ","], "--methods"), (["--part", "x"], "invalid choice"),
    (["--limit-per-cell", "0"], "--limit-per-cell >= 1"), (["--limit-per-cell", "x"], "invalid int value"),
    (["--corrupt-seed", "-1"], "--corrupt-seed"), (["--prior", "-1"], "--prior >= 0"),
    (["--prior", "nan"], "--prior >= 0"), (["--adapt-on", "fog:9"], "expected a cell"),
    (["--adapt-on", "fog"], "expected a cell"), (["--device", "nope"], "expected a torch --device"),
    (["--model", "resnet9"], "expected a model name"), (["--checkpoint", "{p}/none.pt"], "checkpoint file"),
    (["--checkpoint", "{p}/junk.pt"], "expected a PyTorch checkpoint"),
    (["--data", "cifar:{p}"], "expected --data"), (["--data", "generate:mnist:{p}/in.npz"], "expected generate"),
    (["--data", "npz:{p}/none.npz"], "found nothing"), (["--data", "cifar-c:{p}/none"], "found nothing"),
    (["--data", "cifar-c:{p}"], "labels.npy"), (["--data", "npz:{p}/empty.npz"], "at least one image"),
    (["--data", "npz:{p}/float.npz"], "expected uint8"), (["--clean", "{p}/none.npz"], "--clean"),
    (["--baseline", "{p}/none.json"], "baseline JSON"), (["--baseline", "{p}/in.npz"], "baseline JSON"),
    (["--out", "{p}/in.npz/b/c"], "got a file"),
]  # fmt: skip


# sweep shares bench's arguments and code: a sample of them is enough there.
BENCH_CASES = [("bench", e, m) for e, m in BENCH_BAD] + [
    ("sweep", e, m) for e, m in BENCH_BAD if e[0] in ("-b", "--n", "--severities", "--prior", "--device")
]


@pytest.mark.parametrize(
    ("command", "extra", "match"), BENCH_CASES, ids=[f"{c} {' '.join(e)}" for c, e, _ in BENCH_CASES]
)
def test_bench_bad_values(cli_setup, command, extra, match):
    _refused(cli_setup, _bench(cli_setup, command), extra, match)
    assert not (cli_setup / "o").exists()  # refused before any output was written


def _adapt(p):
    return ["adapt", "--model", "cifar10_resnet20", "--checkpoint", str(p / "ck.pt"), "--images",
            str(p / "in.npz"), "--out", str(p / "o.pt"), "--n", "8"]  # fmt: skip


ADAPT_BAD = [
    (["--n", "0"], "positive integer"), (["--n", "-3"], "positive integer"), (["--n", "x"], "positive integer"),
    (["--n", "41"], "n <= the number of images"), (["--seed", "-1"], "non-negative integer seed"),
    (["--seed", "x"], "invalid int value"), (["-b", "0"], "positive integer"), (["--first", "0"], "positive integer"),
    (["--last", "-1"], "positive integer"), (["--method", "nope"], "invalid choice"),
    (["--method", "ema"], "adapts while it runs"), (["--part", "x"], "invalid choice"),
    (["--prior", "-1"], "N >= 0"), (["--prior", "nan"], "N >= 0"), (["--layers", "head*"], "matched none"),
    (["--out", "{p}/o.txt"], ".safetensors"), (["--out", "{p}/in.npz/o.pt"], "got a file"),
    (["--images", "{p}/none.npz"], "found nothing"), (["--images", "{p}/empty.npz"], "at least one image"),
    (["--images", "{p}/float.npz"], "expected uint8"), (["--images", "{p}/junk.pt"], ".npz or .npy"),
    (["--checkpoint", "{p}/junk.pt"], "expected a PyTorch checkpoint"), (["--model", "nope"], "expected a model"),
]  # fmt: skip


@pytest.mark.parametrize(("extra", "match"), ADAPT_BAD, ids=[" ".join(e) for e, _ in ADAPT_BAD])
def test_adapt_bad_values(cli_setup, extra, match):
    _refused(cli_setup, _adapt(cli_setup), extra, match)
    assert not list(cli_setup.glob("o.*")) and not list(cli_setup.glob(".o.*"))


def _corrupt(p):
    return ["corrupt", "--input", str(p / "in.npz"), "--profile", "cifar", "--format", "cifar-c", "--out",
            str(p / "o"), "--corruptions", "contrast", "--severities", "1", "--no-progress"]  # fmt: skip


CORRUPT_BAD = [
    (["-j", "0"], "positive integer"), (["-j", "-1"], "positive integer"), (["-j", "x"], "positive integer"),
    (["--seed", "-1"], "non-negative seed"), (["--seed", "x"], "invalid int value"),
    (["--severities", "0"], "within 1..5"), (["--severities", "6"], "within 1..5"),
    (["--severities", "a"], "expected integers"), (["--severities", "5-1"], "non-negative integers"),
    (["--severities", "1-"], "expected integers"), (["--corruptions", "fogg"], "expected corruption names"),
    (["--profile", "mnist"], "invalid choice"), (["--format", "imagenet"], "invalid choice"),
    (["--input", "{p}/none.npz"], "found nothing"), (["--out", "{p}/in.npz/b"], "got a file"),
]  # fmt: skip


@pytest.mark.parametrize(("extra", "match"), CORRUPT_BAD, ids=[" ".join(e) for e, _ in CORRUPT_BAD])
def test_corrupt_bad_values(cli_setup, extra, match):
    _refused(cli_setup, _corrupt(cli_setup), extra, match)
    assert not (cli_setup / "o").exists()


@pytest.mark.parametrize(("name", "match"), [("empty.npz", "at least one image"), ("float.npz", "expected uint8")])
def test_corrupt_bad_input_contents(cli_setup, name, match):
    """Input files that exist but hold no usable images: refused, and no output folder is left behind."""
    _assert_usage_error(*_run(_with(_corrupt(cli_setup), ["--input", str(cli_setup / name)])), match)
    assert not (cli_setup / "o").exists()


def test_report_and_demo_bad_values(tmp_path):
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "results.jsonl").write_text('{"a": 1}\n{"header": 5}\nnot json\n')
    cases = [
        (["report", str(tmp_path / "none")], "expected a results file"),
        (["report", str(tmp_path)], "expected a results file"),
        (["report", str(tmp_path / "foreign")], "expected result rows"),  # foreign lines are skipped, not a KeyError
        (["report", str(tmp_path), "--format", "pdf"], "invalid choice"),
        (["demo", "--seed", "x", "--out", str(tmp_path / "d")], "invalid int value"),
        (["demo", "--seed", "-1", "--out", str(tmp_path / "d")], "non-negative integer --seed"),
        (["demo", "--out", f"{os.devnull}/b"], "got a file"),  # before minutes of training
    ]
    for argv, match in cases:
        _assert_usage_error(*_run(argv), match)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign"]


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        ([], "required: command"),
        (["nope"], "invalid choice"),
        (["adapt", "--model", "cifar10_resnet20", "--out", "x.pt"], "required: --images"),
        (["corrupt", "--input", "x.npz", "--profile", "cifar", "--format", "cifar-c"], "required: --out"),
        (["bench", "--data", "npz:x.npz", "--out", "o"], "required: --model"),
        (["sweep", "--model", "cifar10_resnet20", "--out", "o"], "required: --data"),
        (["report"], "required: dir"),
        (["demo", "--bogus"], "unrecognized arguments"),
        (["bench", "--model"], "expected at least one argument"),
        (["adapt", "--first", "1", "--last", "1"], "not allowed with argument"),
    ],
)
def test_missing_or_unknown_arguments(argv, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _assert_usage_error(*_run(argv), match)
    assert not list(tmp_path.iterdir())


# Token soup: every command is poisoned at the end (a nonexistent input, an output under a file) so that it fails
# fast after parsing; what is fuzzed is the parsing and validation of everything before that.
JUNK = ["-b", "0", "-1", "1.5", "x", "-j", "--n", "5-1", "1-", "", "--seeds", "--seed", "--severities", "6", "0-3",
        "--methods", "source,nope", "--corruptions", "fogg", "all", "--prior", "nan", "--part", "mean", "-v",
        "--adapt-on", "fog:3", "--limit-per-cell", "--device", "meta", "--layers", "--first", "--last", "2",
        "--format", "csv", "--profile", "imagenet", "--method", "prior", "--model", "cifar10_resnet20", "timm:x",
        "--", "-", "--help", "--no-plots", "--resume", "--force", "--trust-checkpoint", "--allow-partial",
        "--amp", "--channels-last", "\x00", "é", "--skip-bad"]  # fmt: skip


def _poison(sub: str, p) -> list[str]:
    none, no_out = str(p / "none"), f"{os.devnull}/o"  # missing parents of --out are created, a file is refused
    return {
        "adapt": ["--model", "cifar10_resnet20", "--images", f"{none}.npz", "--out", f"{no_out}.pt"],
        "corrupt": ["--input", f"{none}.npz", "--profile", "cifar", "--format", "cifar-c", "--out", no_out],
        "bench": ["--model", "cifar10_resnet20", "--data", f"npz:{none}.npz", "--out", no_out],
        "sweep": ["--model", "cifar10_resnet20", "--data", f"npz:{none}.npz", "--out", no_out],
        "report": [none],
        "demo": ["--out", no_out],
    }[sub]


@settings(max_examples=40, deadline=None, suppress_health_check=FIXTURES)
@given(
    verbose=st.booleans(),
    sub=st.sampled_from(["adapt", "corrupt", "bench", "sweep", "report", "demo"]),
    junk=st.lists(st.sampled_from(JUNK), max_size=8),
)
def test_random_tokens_exit_cleanly(tmp_path, monkeypatch, verbose, sub, junk):
    monkeypatch.chdir(tmp_path)
    argv = [*(["-v"] if verbose else []), sub, *junk, *_poison(sub, tmp_path)]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
        except USER_ERRORS:  # -v re-raises user errors with their traceback, by design
            assert verbose, argv
            code = 2
    assert code in (0, 2), (argv, err.getvalue())
    if code == 0:
        assert "--help" in junk  # nothing can succeed with the poisoned paths
    elif not verbose:
        lines = err.getvalue().strip().splitlines()
        assert lines and lines[-1].startswith("bnadapt") and ": error: " in lines[-1], argv
    assert not list(tmp_path.iterdir())  # nothing written, not even into the working directory
