"""The torch path (the torch variants in the family modules, corruptions/torch_path.py) against the numpy engine:
same seed, same bytes up to float rounding.

Every torch-path corruption at severities 1, 3 and 5 in both profiles, on 4 images of 64x64 (cifar profile) and 2 of
224x224 (imagenet profile): synthetic images always, real ImageNet validation images from ../shared when present.
Measured on the CPU (docs/fragments/gpucorrupt-methods.md): all 15 corruptions give identical bytes; the bounds leave
room for another CPU's vectorisation only (>= 99.9% identical, never more than 1 level apart). On CUDA (float64
reductions and cuDNN convolutions in another order) the bound is >= 99.9% within 1 level and mean |diff| < 0.01.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bnadapt.corruptions import BACKENDS, corrupt, torch_corruption_names
from bnadapt.corruptions import REGISTRY as _REGISTRY
from bnadapt.corruptions import torch_path as tp
from bnadapt.corruptions.digital import pil_box_matrix

NAMES = torch_corruption_names()
FALLBACK = ["glass_blur", "elastic_transform", "jpeg_compression", "spatter"]
SIZES = {"cifar": (4, 64), "imagenet": (2, 224)}


def _synthetic(n: int, size: int, seed: int) -> np.ndarray:
    """Smooth colour blobs plus fine texture and a few saturated and grey pixels: every HSV branch and edge case."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (n, max(2, size // 8), max(2, size // 8), 3), dtype=np.uint8)
    x = np.stack([np.asarray(Image.fromarray(c).resize((size, size), Image.BILINEAR)) for c in coarse]).astype(int)
    x += rng.integers(-12, 13, x.shape)
    x[:, : size // 8, : size // 8] = x[:, : size // 8, : size // 8, :1]  # a grey patch (zero saturation)
    x[:, -4:, -4:] = 255
    return np.clip(x, 0, 255).astype(np.uint8)


def _real(shared, n: int, size: int, first: int) -> np.ndarray:
    from PIL import Image

    from bnadapt.data import resize_crop

    files = sorted((shared / "data" / "imagenet_val1300" / "images").iterdir())[first : first + n]
    return np.stack([np.asarray(resize_crop(Image.open(f).convert("RGB"), size, size)) for f in files])


def _compare(x: np.ndarray, name: str, profile: str, device: str = "cpu") -> list[tuple[int, float, float, int]]:
    """(severity, fraction identical, fraction within 1, max |diff|, mean |diff|) for severities 1, 3, 5."""
    rows = []
    for s in (1, 3, 5):
        ref = corrupt(x, name, s, profile=profile, seed=7, start=3)
        t = torch.from_numpy(x).to(device)
        out = corrupt(t, name, s, profile=profile, seed=7, start=3, backend="torch" if device == "cpu" else "auto")
        assert isinstance(out, torch.Tensor) and out.dtype == torch.uint8 and out.device == t.device
        assert out.shape == t.shape
        d = np.abs(out.cpu().numpy().astype(int) - ref)
        rows.append((s, float((d == 0).mean()), float((d <= 1).mean()), int(d.max()), float(d.mean())))
    return rows


def _assert_cpu(rows, name):
    for s, same, _, dmax, _ in rows:
        assert same >= 0.999 and dmax <= 1, (name, s, same, dmax)


@pytest.mark.parametrize("profile", ["cifar", "imagenet"])
@pytest.mark.parametrize("name", NAMES)
def test_torch_path_matches_numpy_synthetic(one_thread, name, profile):
    n, size = SIZES[profile]
    _assert_cpu(_compare(_synthetic(n, size, seed=1), name, profile), name)


@pytest.mark.shared
@pytest.mark.parametrize("profile", ["cifar", "imagenet"])
@pytest.mark.parametrize("name", NAMES)
def test_torch_path_matches_numpy_real(one_thread, shared, name, profile):
    n, size = SIZES[profile]
    _assert_cpu(_compare(_real(shared, n, size, first=10), name, profile), name)


@pytest.mark.cuda
@pytest.mark.parametrize("profile", ["cifar", "imagenet"])
@pytest.mark.parametrize("name", NAMES)
def test_torch_path_on_cuda(name, profile):
    from bnadapt.corruptions.weather import frost_dir

    if name == "frost" and frost_dir() is None:  # a bare GPU machine may lack the imagecorruptions textures
        pytest.skip("frost textures not installed (pip install imagecorruptions or set BNADAPT_FROST_DIR)")
    n, size = SIZES[profile]
    for s, same, within1, dmax, mad in _compare(_synthetic(n, size, seed=2), name, profile, device="cuda"):
        assert same >= 0.999 and dmax <= 1, (name, s, same, within1, dmax, mad)  # measured on an H200: identical


def test_names_and_fallbacks():
    assert len(NAMES) == 15 and not set(NAMES) & set(FALLBACK)
    assert set(NAMES) | set(FALLBACK) == set(_REGISTRY)
    # Documented in the module docstring, which is what users read.
    for name in NAMES + FALLBACK:
        assert name in tp.__doc__


def test_fallback_runs_numpy_and_keeps_the_type():
    x = _synthetic(2, 32, seed=3)
    for name in FALLBACK:
        out = corrupt(torch.from_numpy(x), name, 2, profile="cifar", seed=0, backend="torch")
        assert isinstance(out, torch.Tensor)
        assert np.array_equal(out.numpy(), corrupt(x, name, 2, profile="cifar", seed=0))


def test_backend_choice(monkeypatch):
    calls = []
    real = tp.corrupt_tensor
    monkeypatch.setattr(tp, "corrupt_tensor", lambda *a: calls.append(a[1]) or real(*a))
    x = _synthetic(2, 32, seed=4)
    corrupt(torch.from_numpy(x), "contrast", 2, profile="cifar")  # auto on a CPU tensor: numpy
    corrupt(x, "contrast", 2, profile="cifar", backend="numpy")
    assert calls == []
    out = corrupt(x, "contrast", 2, profile="cifar", backend="torch")  # numpy in, numpy out
    assert calls == ["contrast"] and isinstance(out, np.ndarray) and out.dtype == np.uint8
    assert BACKENDS == ("auto", "numpy", "torch")
    with pytest.raises(ValueError, match="expected backend"):
        corrupt(x, "contrast", 2, profile="cifar", backend="cuda")
    with pytest.raises(TypeError, match="expected uint8"):
        corrupt(torch.from_numpy(x).float(), "contrast", 2, profile="cifar", backend="torch")
    with pytest.raises(ValueError, match="at least 32x32"):
        corrupt(torch.from_numpy(x[:, :16]), "contrast", 2, profile="cifar", backend="torch")


@pytest.mark.parametrize("name", ["brightness", "saturate", "frost", "gaussian_noise", "snow"])
def test_single_grey_image_and_indices(one_thread, name):
    # Grey images through the rgb_only corruptions (expanded to RGB and back to luma), a single (H, W, C) image, an
    # explicit index and the legacy RandomState streams, all as the numpy engine.
    x = _synthetic(3, 40, seed=5)[..., :1]
    for seed, kw in ((0, {"indices": [5, 9, 2]}), ("legacy", {"start": 4})):
        ref = corrupt(x, name, 4, profile="cifar", seed=seed, **kw)
        out = corrupt(torch.from_numpy(x), name, 4, profile="cifar", seed=seed, backend="torch", **kw).numpy()
        assert out.shape == x.shape and (np.abs(out.astype(int) - ref) <= 1).mean() >= 0.999
    one = corrupt(torch.from_numpy(x[1]), name, 4, profile="cifar", seed=0, start=1, backend="torch")
    assert one.shape == x[1].shape
    assert np.array_equal(one.numpy(), corrupt(x[1:2], name, 4, profile="cifar", seed=0, start=1)[0])


def test_pil_box_matrix_rows_sum_to_one_in_fixed_point():
    # Pillow's normalised coefficients: each output reads a non-empty run of inputs with weights summing to ~2^22.
    for a, b in ((224, 134), (64, 60), (61, 224), (32, 20)):
        m = pil_box_matrix(a, b)
        assert m.shape == (b, a) and (m.sum(1) > 0).all()
        assert np.abs(m.sum(1) - 2**22).max() <= m.shape[1]


@pytest.mark.parametrize("name", ["shot_noise", "impulse_noise", "fog", "snow"])
def test_threaded_draws_give_the_same_numbers(one_thread, monkeypatch, name):
    # The host draws in a thread pool (one image per task) whatever the machine's core count.
    monkeypatch.setattr(tp, "_DRAW_THREADS", 4)
    monkeypatch.setattr(tp, "_POOL", None)
    x = _synthetic(5, 128, seed=6)
    out = corrupt(x, name, 3, profile="imagenet", seed=11, backend="torch")
    assert tp._POOL is not None
    assert np.array_equal(out, corrupt(x, name, 3, profile="imagenet", seed=11))
