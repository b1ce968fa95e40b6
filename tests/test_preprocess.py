"""Each model's own preprocessing (resize + centre crop, mean/std) applied where images are read from files or arrays:
`adapt --images`, `bench --data folder:`/`npz:` and cifar-c's `--clean`; timm's flags override it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from bnadapt.cli import main
from bnadapt.data import Preprocess, open_data, read_images, resize_crop, to_float_nchw
from bnadapt.models import Classifier, efficientnet_lite0, load_model, override_preprocessing, preprocess_of
from bnadapt.results import read_results
from conftest import make_tiny


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _watched(preprocessing: dict, seen: list, mean=(0.5,) * 3, std=(0.25,) * 3) -> Classifier:
    """A tiny BN net (5 classes) with the given preprocessing record; ``seen`` collects (H, W, max) of its inputs."""
    model = Classifier(make_tiny(), mean, std, preprocessing)
    model.net.register_forward_pre_hook(lambda _, args: seen.append((*args[0].shape[-2:], float(args[0].max()))))
    return model


def _serve(monkeypatch, models: dict) -> None:
    """Make the CLI's load_model return these models by name (weights-free stand-ins of real ones)."""
    monkeypatch.setattr("bnadapt.models.load_model", lambda name, *args, **kwargs: models[name])


def _mixed_folder(root, sizes=((300, 250), (180, 260), (224, 224), (40, 64))):
    """A class folder (classes 0 and 1) of images of mixed sizes, PNG and JPEG."""
    for k, (w, h) in enumerate(sizes):
        (root / str(k % 2)).mkdir(parents=True, exist_ok=True)
        _photo(w, h, k).save(root / str(k % 2) / f"im{k}.{'png' if k % 2 else 'jpg'}")
    return root


# --- the same pixels as the libraries' own evaluation transforms ---


@pytest.mark.parametrize(
    "overrides", [{}, {"img_size": 100, "crop_pct": 0.5, "interpolation": "nearest"}, {"interpolation": "bicubic"}]
)
def test_timm_model_prepared_as_timms_eval_transform(overrides):
    pytest.importorskip("timm")
    from timm.data import create_transform, resolve_data_config

    model = override_preprocessing(load_model("timm:test_resnet"), **overrides)
    cfg = resolve_data_config(model=model.net)
    if overrides.get("img_size"):
        cfg["input_size"] = (3, overrides["img_size"], overrides["img_size"])
    cfg.update({k: v for k, v in overrides.items() if k in ("crop_pct", "interpolation")})
    theirs = create_transform(**cfg, is_training=False)
    im = _photo(301, 217)
    ours = preprocess_of(model).image(im)
    assert np.array_equal(np.asarray(ours), np.asarray(_pil_part(theirs)(im)))
    # The whole pipeline, normalisation included, is timm's: the model's Normalize on [0, 1] gives its tensor.
    x = model.normalize(to_float_nchw(np.asarray(ours)))[0]
    assert torch.allclose(x, theirs(im), atol=1e-6)


def _pil_part(compose):
    """The resize and crop of a torchvision Compose, without its to-tensor and normalisation."""
    from torchvision import transforms

    return transforms.Compose(compose.transforms[:-2])


def test_torchvision_weights_prepared_as_their_transforms(monkeypatch):
    import torchvision

    # The weights' record without their file: the network is replaced, the transforms are the enum's own.
    monkeypatch.setattr("bnadapt.models._cached_or_fail", lambda url, name: None)
    monkeypatch.setattr(torchvision.models, "get_model", lambda arch, weights=None: make_tiny())
    model = load_model("torchvision:resnet50", weights="IMAGENET1K_V2")
    assert preprocess_of(model) == Preprocess(224, 232, "bilinear")
    im = _photo(333, 250)
    theirs = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.transforms()(im)
    ours = model.normalize(to_float_nchw(np.asarray(preprocess_of(model).image(im))))[0]
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_resize_crop_is_imagenet_cs_resize_256_crop_224():
    im = _photo(500, 375)
    ref = im.resize((341, 256), Image.BILINEAR).crop((58, 16, 282, 240))  # Resize(256) + CenterCrop(224) by hand
    assert np.array_equal(np.asarray(resize_crop(im)), np.asarray(ref))


# --- what the built-ins record, and the overrides ---


def test_builtins_and_timm_resolve_their_preprocessing():
    pytest.importorskip("timm")
    assert preprocess_of(efficientnet_lite0()) == Preprocess(224, 256, "bilinear")
    assert preprocess_of(load_model("cifar10_resnet20", pretrained=False)) == Preprocess(32, 32)
    assert preprocess_of(load_model("timm:test_resnet")) == Preprocess(160, 168, "bilinear")  # crop_pct 0.95
    assert preprocess_of(Classifier(make_tiny(), (0.5,) * 3, (0.5,) * 3)) is None  # records no size: as they are


def test_non_square_input_size_reads_images_as_they_are(caplog):
    model = Classifier(make_tiny(), (0.5,) * 3, (0.5,) * 3, {"input_size": [3, 256, 192]})
    assert preprocess_of(model) is None and "not square" in caplog.text
    assert preprocess_of(override_preprocessing(model, img_size=96)) == Preprocess(96, 96)


def test_override_copies_and_records_everything():
    model = efficientnet_lite0()
    before = dict(model.preprocessing)
    new = override_preprocessing(model, img_size=192, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2))
    assert model.preprocessing == before and torch.allclose(
        model.normalize.mean.flatten(), torch.tensor([127 / 255] * 3)
    )
    assert preprocess_of(new) == Preprocess(192, 219, "bilinear")  # 192 / (224 / 256), the crop fraction kept
    assert new.preprocessing["input_size"] == [3, 192, 192] and new.preprocessing["mean"] == [0.5, 0.4, 0.3]
    assert new.normalize.std.flatten().tolist() == pytest.approx([0.2] * 3)


def test_preprocess_values_checked_and_kept_exact():
    assert Preprocess(224, 232).replace(size=224) == Preprocess(224, 232)  # 224 / (224 / 232) in floats is 231.99..
    assert Preprocess(224, 232).replace(crop_pct=0.875).resize == 256
    for bad in (lambda: Preprocess(0, 1), lambda: Preprocess(224, 200), lambda: Preprocess(8, 8, "cubic")):
        with pytest.raises(ValueError, match="expected"):
            bad()
    with pytest.raises(ValueError, match="0 < crop_pct <= 1"):
        Preprocess.from_crop_pct(224, 1.5)
    with pytest.raises(ValueError, match="3 finite --mean values"):
        override_preprocessing(efficientnet_lite0(), mean=(0.5, 0.5))


# --- readers ---


def test_arrays_of_the_models_size_stay_others_are_prepared(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (3, 40, 50, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", x=x, y=np.arange(3))
    prep = Preprocess(32, 36, "bicubic")
    got, _ = read_images(tmp_path / "a.npz", preprocess=prep)
    assert np.array_equal(got[1], np.asarray(resize_crop(Image.fromarray(x[1]), 36, 32, "bicubic")))
    np.savez(tmp_path / "b.npz", x=x[:, :32, :32], y=np.arange(3))
    assert np.array_equal(read_images(tmp_path / "b.npz", preprocess=prep)[0], x[:, :32, :32])  # already the size


def test_clean_set_of_imagenet_c_keeps_its_protocol_cifar_c_takes_the_models(tmp_path):
    from conftest import write_imagenet_c

    write_imagenet_c(tmp_path / "inc", 224)
    clean = _mixed_folder(tmp_path / "clean")
    prep = Preprocess(32, 36)
    data = open_data(f"imagenet-c:{tmp_path / 'inc'}", ["fog"], [1], clean=clean, preprocess=prep)
    assert data.cell("clean", 0).get(np.arange(4)).shape == (4, 224, 224, 3)  # resize 256, crop 224
    (tmp_path / "cc").mkdir()
    np.save(tmp_path / "cc" / "fog.npy", np.zeros((10, 32, 32, 3), np.uint8))
    np.save(tmp_path / "cc" / "labels.npy", np.zeros(10, np.int64))
    data = open_data(f"cifar-c:{tmp_path / 'cc'}", ["fog"], [1], clean=clean, preprocess=prep)
    assert data.cell("clean", 0).get(np.arange(4)).shape == (4, 32, 32, 3)


# --- the command line ---


def _adapt(tmp_path, *extra):
    return ["adapt", "--model", "lite0", "--images", str(tmp_path / "photos"), "--n", "4", "--out",
            str(tmp_path / "a.pt"), *extra]  # fmt: skip


def test_adapt_on_mixed_sizes_sees_the_models_224(tmp_path, monkeypatch, one_thread):
    seen: list = []
    _serve(monkeypatch, {"lite0": _watched(efficientnet_lite0().preprocessing, seen)})
    _mixed_folder(tmp_path / "photos")
    assert main(_adapt(tmp_path)) == 0
    assert seen and {s[:2] for s in seen} == {(224, 224)}
    meta = torch.load(tmp_path / "a.pt", weights_only=True)["bnadapt"]
    assert json.loads(meta["preprocessing"])["crop"] == 224


def test_adapt_overrides_change_what_the_network_sees(tmp_path, monkeypatch, one_thread):
    seen: list = []
    _serve(monkeypatch, {"lite0": _watched(efficientnet_lite0().preprocessing, seen)})
    _mixed_folder(tmp_path / "photos")
    flags = ["--img-size", "96", "--crop-pct", "0.5", "--interpolation", "bicubic", "--mean", "1", "1", "1", "--std",
             "0.5", "0.5", "0.5"]  # fmt: skip
    assert main(_adapt(tmp_path, *flags)) == 0
    assert {s[:2] for s in seen} == {(96, 96)} and max(s[2] for s in seen) <= 0  # (x - 1) / 0.5
    prep = json.loads(torch.load(tmp_path / "a.pt", weights_only=True)["bnadapt"]["preprocessing"])
    assert (prep["crop"], prep["resize"], prep["interpolation"], prep["mean"]) == (96, 192, "bicubic", [1.0] * 3)


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--crop-pct", "0"], "0 < F <= 1"),
        (["--crop-pct", "1.5"], "0 < F <= 1"),
        (["--img-size", "-3"], "positive integer"),
        (["--interpolation", "cubic"], "invalid choice"),
        (["--std", "0", "1", "1"], "positive number"),
        (["--mean", "nan", "0", "0"], "finite number"),
        (["--mean", "0.5", "0.5"], "expected 3 arguments"),
    ],
)
def test_bad_preprocessing_flags_one_line_exit_2(tmp_path, capsys, flags, match):
    for command in (_adapt(tmp_path, *flags), ["bench", "--model", "m", "--data", "folder:x", "--out", "o", *flags]):
        with pytest.raises(SystemExit) as exc:
            main(command)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and match in err and len(err.strip().splitlines()) == 1, err


def test_bench_folder_with_mixed_sizes_runs(tmp_path, monkeypatch, one_thread, capsys):
    seen: list = []
    _serve(monkeypatch, {"tiny": _watched({"input_size": [3, 24, 24], "crop_pct": 0.875}, seen)})
    data = _mixed_folder(tmp_path / "photos")
    assert main(["bench", "--model", "tiny", "--data", f"folder:{data}", "--n", "2", "--out", str(tmp_path / "o"),
                 "--no-progress", "--no-plots", "--device", "cpu"]) == 0  # fmt: skip
    headers, rows = read_results(tmp_path / "o")
    assert [r["total"] for r in rows] == [4, 4] and {s[:2] for s in seen} == {(24, 24)}
    assert headers[0]["preprocessing"]["tiny"]["input_size"] == [3, 24, 24]


def test_bench_refuses_models_that_prepare_folders_differently(tmp_path, monkeypatch, capsys):
    _serve(
        monkeypatch, {"a": _watched({"input_size": [3, 24, 24]}, []), "b": _watched({"input_size": [3, 32, 32]}, [])}
    )
    data = _mixed_folder(tmp_path / "photos")
    code = main(
        ["bench", "--model", "a", "b", "--data", f"folder:{data}", "--out", str(tmp_path / "o"), "--no-progress"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "prepare folder: data alike" in err and len(err.strip().splitlines()) == 1, err
