"""Fuzzing of files read from disk: datasets (npz/npy, CIFAR-C, ImageNet-C, class folders), checkpoints and BN
statistics.

A damaged, truncated, mistyped or hostile file must end in a specific exception whose message starts with
"expected" (or "refusing") and names the file, never a raw numpy/torch/PIL/pickle error, and never a silently wrong
result. Nothing is ever unpickled without ``trust=True``: hostile pickles would create a marker file, which must not
exist afterwards.
"""

from __future__ import annotations

import gc
import io
import json
import pickle
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import nn

from bnadapt import BNStats
from bnadapt.benchmark import BenchConfig, run_benchmark
from bnadapt.data import DATA_KINDS, iter_batches_of, open_clean, open_data, parse_data_spec, read_images
from bnadapt.models import cifar_resnet, load_checkpoint_into, load_model
from conftest import make_tiny

pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
FUZZ = settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
RNG = np.random.default_rng(0)
IMAGES = RNG.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)


class Hostile:
    """Unpickling this creates ``path`` (``open(path, "w")``): proof that a pickle was executed."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _npy_bytes(a: np.ndarray) -> bytes:
    f = io.BytesIO()
    np.save(f, a, allow_pickle=True)
    return f.getvalue()


def _image_bytes(fmt: str, size=(32, 32)) -> bytes:
    f = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(f, fmt)
    return f.getvalue()


# --- .npy / .npz read by read_images / open_clean --------------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_truncated_npy_and_npz_named(tmp_path, data):
    good_npy = _npy_bytes(IMAGES)
    f = io.BytesIO()
    np.savez_compressed(f, x=IMAGES, y=np.arange(10))
    for suffix, good in ((".npy", good_npy), (".npz", f.getvalue())):
        cut = data.draw(st.integers(0, len(good) - 1), label=f"cut{suffix}")
        path = tmp_path / f"cut{suffix}"
        path.write_bytes(good[:cut])
        with pytest.raises(ValueError, match="expected a readable numpy file, got a damaged one") as e:
            read_images(path)
        assert path.name in str(e.value)


@FUZZ
@given(
    prefix=st.sampled_from([b"", b"\x93NUMPY\x01\x00", b"\x93NUMPY\x02\x00", b"PK\x03\x04", b"\x80\x04"]),
    body=st.binary(max_size=200),
    suffix=st.sampled_from([".npy", ".npz"]),
)
def test_random_bytes_npy_npz(tmp_path, prefix, body, suffix):
    path = tmp_path / f"r{suffix}"
    path.write_bytes(prefix + body)
    with pytest.raises((ValueError, TypeError), match="^expected") as e:
        read_images(path)
    assert path.name in str(e.value)


@pytest.mark.parametrize(
    ("arrays", "exc", "match"),
    [
        ({"x": IMAGES.astype(np.float32)}, TypeError, "expected uint8 images in bad.npz"),
        ({"x": IMAGES.astype(np.int64), "y": np.arange(10)}, TypeError, "expected uint8 images"),
        ({"x": IMAGES.astype(bool)}, TypeError, "expected uint8 images"),
        ({"x": IMAGES[..., 0]}, ValueError, r"with C = 1 or 3 channels last, got shape \(1, 10, 32, 32\)"),
        ({"x": IMAGES.transpose(0, 3, 1, 2)}, ValueError, r"got shape \(10, 3, 32, 32\)"),
        ({"x": IMAGES[:0], "y": np.arange(0)}, ValueError, "expected at least one image"),
        ({"x": np.uint8(3)}, ValueError, "expected at least one image"),
        ({"a": IMAGES, "b": IMAGES}, ValueError, r"expected an .npz with an 'x' array"),
        ({"x": IMAGES, "y": np.arange(9)}, ValueError, r"expected integer labels 'y' of shape \(10,\)"),
        ({"x": IMAGES, "y": np.arange(10.0)}, ValueError, "expected integer labels 'y'"),
        ({"x": IMAGES, "y": np.zeros((10, 1), int)}, ValueError, "expected integer labels 'y'"),
        ({"x": IMAGES, "y": np.array(["a"] * 10)}, ValueError, "expected integer labels 'y'"),
    ],
)
def test_npz_contents_refused(tmp_path, arrays, exc, match):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(exc, match=match):
        read_images(tmp_path / "bad.npz")


def test_npz_archive_named_npy(tmp_path):
    np.savez(tmp_path / "a.npz", x=IMAGES)
    (tmp_path / "a.npy").write_bytes((tmp_path / "a.npz").read_bytes())
    with pytest.raises(ValueError, match="expected one array in the .npy file .*a.npy, got an .npz archive"):
        read_images(tmp_path / "a.npy")


def test_npz_without_labels_refused_as_clean_set(tmp_path):
    np.savez(tmp_path / "noy.npz", x=IMAGES)
    assert read_images(tmp_path / "noy.npz")[1] is None  # images only: fine to adapt on
    with pytest.raises(ValueError, match="expected labels 'y' in noy.npz"):
        open_clean(tmp_path / "noy.npz")


@pytest.mark.parametrize("where", ["x.npy in npz", "y.npy in npz", ".npy"])
def test_object_arrays_never_unpickled(tmp_path, where):
    marker = tmp_path / "MARKER"
    hostile = np.array([Hostile(marker)] * 2, dtype=object)
    if where == ".npy":
        (tmp_path / "h.npy").write_bytes(_npy_bytes(hostile))
        path = tmp_path / "h.npy"
    else:
        arrays = {"x": hostile, "y": np.arange(2)} if where.startswith("x") else {"x": IMAGES[:2], "y": hostile}
        np.savez(tmp_path / "h.npz", **arrays)
        path = tmp_path / "h.npz"
    assert not marker.exists()
    with pytest.raises(ValueError, match="it holds Python objects .pickled data., which bnadapt never loads"):
        read_images(path)
    with pytest.raises(ValueError, match="never loads"):
        open_data(f"npz:{path}")
    assert not marker.exists()


# --- CIFAR-C folders -----------------------------------------------------------------------------------------------


def _cifar_c(root: Path, x=None, labels=None) -> Path:
    root.mkdir(exist_ok=True)
    x = np.random.default_rng(1).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8) if x is None else x
    np.save(root / "fog.npy", x)
    np.save(root / "labels.npy", np.arange(len(x)) % 10 if labels is None else labels, allow_pickle=True)
    return root


def _cell(root: Path, severity: int = 2):
    s = open_data(f"cifar-c:{root}", ["fog"], [severity]).cell("fog", severity)
    return s.get(np.arange(len(s))), s.labels


def test_cifar_c_valid_reference(tmp_path):
    x = np.random.default_rng(2).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    got, labels = _cell(_cifar_c(tmp_path / "c", x=x), severity=2)
    assert np.array_equal(got, x[4:8]) and labels.tolist() == [4, 5, 6, 7]


@FUZZ
@given(data=st.data(), which=st.sampled_from(["fog.npy", "labels.npy"]))
def test_cifar_c_truncated_files_named(tmp_path, data, which):
    root = _cifar_c(tmp_path / "c")
    good = (root / which).read_bytes()
    (root / which).write_bytes(good[: data.draw(st.integers(0, len(good) - 1))])
    with pytest.raises(ValueError, match="expected a readable numpy file, got a damaged one") as e:
        _cell(root)
    assert which in str(e.value)


@pytest.mark.parametrize(
    ("x", "labels", "match"),
    [
        (IMAGES.astype(np.float32), None, r"expected uint8 \(N, H, W, C\) images in fog:2, got float32"),
        (IMAGES[..., 0], None, r"got uint8 \(2, 32, 32\)"),
        (IMAGES.transpose(0, 3, 1, 2), None, r"got uint8 \(2, 3, 32, 32\)"),
        (IMAGES, np.arange(15), "expected fog.npy to have as many images as labels.npy has labels"),
        (None, np.arange(23), "expected labels.npy to hold 5 severity blocks"),
        (None, np.arange(20) * 0.5, r"expected labels.npy in .* to hold integer class labels of shape \(N,\)"),
        (None, np.zeros((20, 1), int), "to hold integer class labels"),
        (None, np.zeros(0, int), "to hold integer class labels"),
        (None, np.int64(3), "expected an array in the numpy file"),
        (None, np.array([None] * 20, dtype=object), "never loads"),
    ],
    ids=["float32", "NHW", "NCHW", "labels-15", "labels-23", "labels-float", "labels-2d", "labels-empty",
         "labels-scalar", "labels-object"],
)  # fmt: skip
def test_cifar_c_bad_contents(tmp_path, x, labels, match):
    with pytest.raises(ValueError, match=match):
        _cell(_cifar_c(tmp_path / "c", x=x, labels=labels))


def test_negative_or_out_of_range_labels_refused_before_any_output(tmp_path):
    """Negative labels read fine (they are integers) but no model knows them: the benchmark refuses them up front."""
    for name, labels in (("neg", -(np.arange(20) % 10)), ("big", np.arange(20) + 5)):
        data = open_data(f"cifar-c:{_cifar_c(tmp_path / name, labels=labels)}", ["fog"], [1])
        with pytest.raises(ValueError, match=r"expected labels in 0\.\.4 for model tiny"):
            run_benchmark({"tiny": make_tiny()}, data, BenchConfig(methods=("source",)), out=tmp_path / f"o{name}")
        assert not (tmp_path / f"o{name}").exists()


def test_cifar_c_missing_and_empty_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="expected labels.npy in the CIFAR-C folder"):
        open_data(f"cifar-c:{tmp_path / 'empty'}", ["fog"], [1])
    root = _cifar_c(tmp_path / "c")
    with pytest.raises(ValueError, match="lacks gaussian_noise.npy"):
        open_data(f"cifar-c:{root}", ["gaussian_noise"], [1])


# --- ImageNet-C and class folders: image files -----------------------------------------------------------------


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, content in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(content)
    return root


def _damaged(kind: str, fmt: str, cut: float, noise: bytes) -> bytes:
    good = _image_bytes(fmt)
    if kind == "truncated":
        return good[: max(1, int(len(good) * cut))]
    if kind == "empty":
        return b""
    return noise  # random bytes under an image name


@settings(max_examples=16, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    kind=st.sampled_from(["truncated", "empty", "random"]),
    fmt=st.sampled_from(["PNG", "JPEG"]),
    cut=st.floats(0.02, 0.8),
    noise=st.binary(min_size=1, max_size=300),
)
def test_damaged_image_files_named_when_read(tmp_path, kind, fmt, cut, noise):
    suffix = ".JPEG" if fmt == "JPEG" else ".png"
    files = {f"fog/1/a/ok{suffix}": _image_bytes(fmt), f"fog/1/b/bad{suffix}": _damaged(kind, fmt, cut, noise)}
    root = _tree(Path(tempfile.mkdtemp(dir=tmp_path)), files)
    # Reading is lazy: opening the data lists files; decoding them names the bad one.
    cell = open_data(f"imagenet-c:{root}", ["fog"], [1]).cell("fog", 1)
    assert len(cell) == 2 and cell.get(np.array([0])).shape == (1, 32, 32, 3)
    # (Random bytes that happen to form another format's valid image would fail the same-size check instead.)
    named = f"^expected (a readable image file, got an unreadable one: |all images of ).*bad{suffix}"
    with pytest.raises(ValueError, match=named):
        cell.get(np.arange(2))
    with pytest.raises(ValueError, match=named):
        list(iter_batches_of([cell], 2))
    with pytest.raises(ValueError, match=f"bad{suffix}"):
        read_images(root / "fog" / "1")


def test_damaged_image_named_from_a_dataloader_worker(tmp_path):
    """A worker's error is re-raised with its own one-line message, not torch's "Caught ValueError in DataLoader
    worker process 0." + traceback (whose first line is all the command line shows)."""
    root = _tree(tmp_path, {"a/ok.png": _image_bytes("PNG"), "b/bad.png": b"\x89PNG\r\n\x1a\n garbage"})
    with pytest.raises(ValueError, match=r"^expected a readable image file, got an unreadable one: \S*bad.png") as e:
        list(iter_batches_of([open_clean(root)], 1, jobs=1))
    assert len(str(e.value).splitlines()) == 1
    del e
    gc.collect()  # shuts the worker down here (torch waits ~5 s for it after an error), not in a later test


@pytest.mark.parametrize(
    ("files", "match"),
    [
        ({}, "lacks fog"),
        ({"fog/1/.keep": b""}, "expected image files in class sub-folders"),
        ({"fog/1/a/readme.txt": b"hi", "fog/1/a/x.npy": b"\x93NUMPY"}, "expected image files in class sub-folders"),
        ({"fog/1/x.png": _image_bytes("PNG")}, r"expected images inside class sub-folders \(<class>/<file>\)"),
        ({"fog/2/a/x.png": _image_bytes("PNG")}, "lacks fog/1"),
    ],
    ids=["no-corruption", "empty-cell", "only-non-images", "no-class-folders", "other-severity"],
)
def test_imagenet_c_layouts_refused(tmp_path, files, match):
    root = _tree(tmp_path / "inc", files)
    root.mkdir(exist_ok=True)
    with pytest.raises(ValueError, match=match):
        open_data(f"imagenet-c:{root}", ["fog"], [1]).cell("fog", 1)


def test_class_folders_empty_or_without_images(tmp_path):
    for name, files in (("empty", {}), ("txt", {"a/notes.txt": b"x", "b/data.csv": b"1,2"})):
        root = _tree(tmp_path / name, files)
        root.mkdir(exist_ok=True)
        with pytest.raises(ValueError, match=r"expected image files \(.jpg"):
            read_images(root)
        with pytest.raises(ValueError, match="expected image files in class sub-folders"):
            open_clean(root)
        with pytest.raises(ValueError, match="expected image files in class sub-folders"):
            open_data(f"folder:{root}")


@FUZZ
@given(spec=st.one_of(st.text(max_size=30), st.sampled_from(DATA_KINDS).map(lambda k: f"{k}:")))
def test_parse_data_spec_total(spec):
    try:
        parsed = parse_data_spec(spec)
    except ValueError as e:
        assert str(e).startswith("expected ") and repr(spec) in str(e)
    else:
        assert parsed.kind in DATA_KINDS and str(parsed.path) and spec.startswith(parsed.kind + ":")


# --- checkpoints -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def r20_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return cifar_resnet(20).net.state_dict()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    prefix=st.sampled_from([b"", b"\x80\x02", b"\x80\x04", b"PK\x03\x04", b"hello", b"(dp0\n"]),
    body=st.binary(max_size=200),
)
def test_random_bytes_checkpoint(tmp_path, prefix, body):
    """Random bytes, pickle-looking or zip-looking, never leak an unpickler error (trust=False: nothing runs)."""
    path = tmp_path / "ck.pt"
    path.write_bytes(prefix + body)
    with pytest.raises(ValueError, match="^(expected a PyTorch checkpoint|refusing to unpickle)") as e:
        load_checkpoint_into(cifar_resnet(20).net, path)
    assert str(path) in str(e.value)


@FUZZ
@given(data=st.data())
def test_truncated_checkpoint(tmp_path, r20_state, data):
    path = tmp_path / "ck.pt"
    torch.save({"state_dict": r20_state}, path)
    good = path.read_bytes()
    path.write_bytes(good[: data.draw(st.integers(0, len(good) - 1))])
    for trust in (False, True):
        with pytest.raises(ValueError, match="^(expected a PyTorch checkpoint|refusing to unpickle)"):
            load_checkpoint_into(cifar_resnet(20).net, path, trust=trust)


@pytest.mark.parametrize(
    ("content", "trust"),
    [(b"", False), (b"", True), (b"hello world\n", False), (b"hello world\n", True), (b"\x80\x04K\x01.", False)],
    ids=["empty", "empty-trusted", "text", "text-trusted", "pickled-int"],
)
def test_empty_text_and_non_dict_checkpoints(tmp_path, content, trust):
    (tmp_path / "ck.pt").write_bytes(content)
    with pytest.raises(ValueError, match="expected a (PyTorch checkpoint|state dict of tensors)") as e:
        load_model("cifar10_resnet20", checkpoint=tmp_path / "ck.pt", trust_checkpoint=trust)
    assert "--trust-checkpoint" not in str(e.value) or not trust  # never tells a trusting user to trust


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda sd: {"foo": torch.zeros(3)}, r"97 missing \(first: \['conv1.weight'\]\) and 1 unexpected"),
        (lambda sd: {}, "97 missing"),
        (lambda sd: {k: torch.zeros(3) for k in sd}, r"expected conv1.weight of shape \(16, 3, 3, 3\)"),
        (lambda sd: {**sd, "linear.weight": torch.zeros(100, 64)}, "expected linear.weight of shape"),
        (lambda sd: {**sd, "bn1.weight": "not a tensor"}, "expected a state dict of tensors"),
        (lambda sd: {1: torch.zeros(1)}, "expected a state dict of tensors"),
        (lambda sd: [torch.zeros(1)], "expected a state dict of tensors"),
        (lambda sd: torch.zeros(3), "expected a state dict of tensors"),
        (lambda sd: {"state_dict": {"conv1.weight": torch.zeros(1)}}, "missing"),
    ],
    ids=["wrong-keys", "empty-dict", "wrong-shapes", "other-classes", "non-tensor", "int-key", "list", "tensor",
         "nested-wrong"],
)  # fmt: skip
def test_checkpoint_contents_refused(tmp_path, r20_state, make, match):
    torch.save(make(r20_state), tmp_path / "ck.pt")
    net = cifar_resnet(20).net
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        load_checkpoint_into(net, tmp_path / "ck.pt")
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # nothing half-loaded


@pytest.mark.parametrize("how", ["pickle", "torch.save", "torch.save-legacy", "whole-module-attr"])
def test_hostile_pickle_never_executed(tmp_path, r20_state, how, capsys):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pt"
    if how == "pickle":
        path.write_bytes(pickle.dumps({"state_dict": Hostile(marker)}))
    elif how == "whole-module-attr":
        net = nn.Sequential(nn.BatchNorm2d(2))
        net.payload = Hostile(marker)
        torch.save(net, path)
    else:
        torch.save({"state_dict": r20_state, "x": Hostile(marker)}, path,
                   _use_new_zipfile_serialization=how == "torch.save")  # fmt: skip
    assert not marker.exists()  # saving does not run __reduce__'s callable
    with pytest.raises(ValueError, match="refusing to unpickle .*--trust-checkpoint"):
        load_model("cifar10_resnet20", checkpoint=path)
    from bnadapt.cli import main

    assert main(["adapt", "--model", "cifar10_resnet20", "--checkpoint", str(path), "--images",
                 str(tmp_path / "none.npz"), "--out", str(tmp_path / "o.pt")]) == 2  # fmt: skip
    assert "refusing to unpickle" in capsys.readouterr().err
    assert not marker.exists()


def test_safetensors_checkpoints(tmp_path, r20_state):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in r20_state.items()}, str(tmp_path / "w.safetensors"))
    model = load_model("cifar10_resnet20", checkpoint=tmp_path / "w.safetensors")
    assert torch.equal(model.net.conv1.weight, r20_state["conv1.weight"])
    save_file({"conv1.weight": torch.zeros(1)}, str(tmp_path / "k.safetensors"))
    with pytest.raises(ValueError, match="expected the checkpoint's keys to fit the architecture"):
        load_model("cifar10_resnet20", checkpoint=tmp_path / "k.safetensors")
    good = (tmp_path / "w.safetensors").read_bytes()
    for name, content in (("t", good[: len(good) // 2]), ("r", bytes(range(256)) * 3), ("e", b"")):
        (tmp_path / f"{name}.safetensors").write_bytes(content)
        with pytest.raises(ValueError, match="expected a PyTorch checkpoint at .*unreadable"):
            load_model("cifar10_resnet20", checkpoint=tmp_path / f"{name}.safetensors")


# --- BN statistics files -------------------------------------------------------------------------------------------


@pytest.fixture
def stats_file(tmp_path) -> Path:
    stats = BNStats.from_model(make_tiny())
    stats.count = {"bn1": 7}
    stats.metadata = {"method": "replace"}
    stats.save(tmp_path / "s.safetensors")
    return tmp_path / "s.safetensors"


def _parts(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118 - not a dict


def _rewrite(path: Path, tensors=None, meta=None) -> Path:
    from safetensors.torch import save_file

    t, m = _parts(path)
    save_file(t if tensors is None else tensors, str(path), metadata=m if meta is None else meta)
    return path


@FUZZ
@given(data=st.data())
def test_bnstats_truncated_or_random(stats_file, data):
    good = stats_file.read_bytes()
    bad = stats_file.with_name("bad.safetensors")
    bad.write_bytes(
        data.draw(
            st.one_of(
                st.integers(0, len(good) - 1).map(lambda cut: good[:cut]),
                st.binary(max_size=300),
                st.binary(max_size=100).map(lambda b: good[:8] + b),  # a plausible header length, then noise
            )
        )
    )
    with pytest.raises(ValueError, match="^expected a (readable )?bnadapt statistics file") as e:
        BNStats.load(bad)
    assert "bad.safetensors" in str(e.value) or "format" in str(e.value)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda t, m: ({k: v for k, v in t.items() if k != "bn1.mean"}, m), "expected tensors for layer 'bn1'"),
        (lambda t, m: ({k.replace("bn2", "bnX"): v for k, v in t.items()}, m), "expected tensors for layer 'bn2'"),
        (lambda t, m: (t, {**m, "layers": '["bn1", "bn9"]'}), "expected tensors for layer 'bn9'"),
        (lambda t, m: (t, {k: v for k, v in m.items() if k != "layers"}), "unreadable one .'layers'."),
        (lambda t, m: (t, {k: v for k, v in m.items() if k != "format"}), "expected a bnadapt statistics file"),
        (lambda t, m: (t, {**m, "format": "bnadapt.bnstats/99"}), "expected a bnadapt statistics file"),
        (lambda t, m: (t, {}), "expected a bnadapt statistics file"),
        (lambda t, m: (t, {**m, "layers": "5"}), "'layers' metadata to be a JSON list of layer names"),
        (lambda t, m: (t, {**m, "layers": "null"}), "'layers' metadata to be a JSON list"),
        (lambda t, m: (t, {**m, "layers": '"bn1"'}), "'layers' metadata to be a JSON list"),
        (lambda t, m: (t, {**m, "layers": "[1, 2]"}), "'layers' metadata to be a JSON list"),
        (lambda t, m: (t, {**m, "layers": "{not json"}), "unreadable one"),
        (lambda t, m: (t, {**m, "count": '{"bn1": "x"}'}), "'count' metadata to map layers to non-negative"),
        (lambda t, m: (t, {**m, "count": "[1]"}), "'count' metadata"),
        (lambda t, m: (t, {**m, "count": '{"bn1": -3}'}), "'count' metadata"),
        (lambda t, m: (t, {**m, "count": '{"bn1": 1.5}'}), "'count' metadata"),
        (lambda t, m: (t, {**m, "user": "[1]"}), "'user' to be a JSON object"),
        (lambda t, m: (t, {**m, "user": "null"}), "'user' to be a JSON object"),
        (lambda t, m: ({**t, "bn1.mean": torch.zeros(7)}, m), r"1-D mean and var for layer 'bn1', got shapes \(7,\)"),
        (lambda t, m: ({**t, "bn1.mean": torch.zeros(8, 1), "bn1.var": torch.ones(8, 1)}, m), "1-D mean and var"),
        (lambda t, m: ({**t, "bn1.mean": torch.tensor(0.0), "bn1.var": torch.tensor(1.0)}, m), "1-D mean and var"),
    ],
    ids=["mean-removed", "renamed", "extra-layer-listed", "no-layers", "no-format", "other-format", "no-metadata",
         "layers-int", "layers-null", "layers-str", "layers-ints", "layers-not-json", "count-str", "count-list",
         "count-negative", "count-float", "user-list", "user-null", "shape-mismatch", "shape-2d", "shape-0d"],
)  # fmt: skip
def test_bnstats_tampered(stats_file, edit, match):
    _rewrite(stats_file, *edit(*_parts(stats_file)))
    with pytest.raises(ValueError, match=match):
        BNStats.load(stats_file)


def test_bnstats_other_dtypes_load_as_float32(stats_file):
    t, m = _parts(stats_file)
    _rewrite(stats_file, {k: v.double() for k, v in t.items()}, m)
    stats = BNStats.load(stats_file)
    assert stats.names == ["bn1", "bn2", "bn3"] and stats.count == {"bn1": 7}
    assert all(stats.mean[n].dtype == torch.float32 and torch.equal(stats.mean[n], t[f"{n}.mean"].float())
               for n in stats.names)  # fmt: skip


def test_bnstats_apply_to_other_models(stats_file):
    stats = BNStats.load(stats_file)
    with pytest.raises(ValueError, match="expected the model to have BN layers .'bn1'"):
        stats.apply_to(cifar_resnet(20))
    with pytest.raises(ValueError, match="expected the model to have BN layers"):
        stats.apply_to(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
    t, m = _parts(stats_file)
    _rewrite(stats_file, {**t, "bn1.mean": torch.zeros(9), "bn1.var": torch.ones(9)}, m)
    target = make_tiny(seed=1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=r"expected \(8,\) channels for BN layer 'bn1'"):
        BNStats.load(stats_file).apply_to(target)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())  # all checked before any write


@pytest.mark.parametrize("bad", ["nan-mean", "inf-var", "negative-var"])
def test_bnstats_non_finite_values_refused(stats_file, bad):
    t, m = _parts(stats_file)
    values = {"nan-mean": ("bn1.mean", float("nan")), "inf-var": ("bn1.var", float("inf")),
              "negative-var": ("bn1.var", -1.0)}[bad]  # fmt: skip
    _rewrite(stats_file, {**t, values[0]: torch.full((8,), values[1])}, m)
    with pytest.raises(ValueError, match="expected"):
        BNStats.load(stats_file)


def test_bnstats_metadata_round_trip_is_json(stats_file):
    """The metadata written by save() is exactly what load() checks (a regression guard for the checks above)."""
    _, meta = _parts(stats_file)
    assert json.loads(meta["layers"]) == ["bn1", "bn2", "bn3"] and json.loads(meta["count"]) == {"bn1": 7}
    assert BNStats.load(stats_file).metadata == {"method": "replace"}
