"""The statistics bank: BN statistics of many known conditions, and the signatures that recognise them.

A deployed model sees a stream of images, often one at a time, under conditions nobody announces (fog, sensor noise,
JPEG, ...). :func:`build_bank` estimates every BN layer's statistics for each named condition from ``n`` of its
images, and a *signature* to recognise it: the per-image channel means and log-stds of the inputs of the first
``k_signature`` BN layers of the source model, summarised per condition by their mean and spread over images, plus
the within-condition covariance pooled over all conditions. The ``bank`` method
(:class:`bnadapt.bank_model.BankModel`) then picks an entry for every incoming batch, down to one image.

The bank is one safetensors file: ``<condition>/<layer>/mean|var``, ``<condition>/#signature/mean|std`` and
``#pooled/covariance`` tensors, and a JSON header in the metadata (conditions, layers, n, seed, model, k_signature,
thresholds, bnadapt version).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ._io import atomic_path
from ._version import __version__
from .adapt import sample_indices
from .bn import BNStats, bn_layers, check_layer_values, estimate_stats, image_moments, iter_batches, model_device
from .data import CLEAN, BenchData, spread_indices, to_float_nchw

log = logging.getLogger(__name__)

__all__ = ["COVARIANCES", "FALLBACK", "Bank", "build_bank", "build_bank_from_data", "image_signatures"]

_FORMAT = "bnadapt.bank/1"
_SIG = "#signature"  # the signature's tensors: '#' keeps them apart from any layer name PyTorch builds
_COV = "#pooled/covariance"  # condition names may not start with '#'
COVARIANCES = ("pooled", "diagonal")  # how entries are scored: one covariance shared by all, or each its own diagonal
FALLBACK = "fallback"  # the selection-count key of batches that got the source statistics
_EPS = 1e-5  # added to a channel's variance before the log: a constant channel (dead ReLU, padding) stays finite
# Floor of a signature dimension's spread: a dimension (nearly) constant over one condition's build images must not
# turn a tiny difference into an enormous distance.
_MIN_SPREAD = 1e-3


# --- signatures: a partial forward of the source model ---


class _StopProbe(Exception):
    """Raised by the last signature layer's hook: the rest of the forward is not needed."""


class _SignatureHook:
    """Forward pre-hook of one signature layer: records each image's channel moments while its probe is active.

    An object rather than a closure, so that a deep copy of the model (as the benchmark makes per cell) gets hooks
    that talk to the copy's probe.
    """

    def __init__(self, probe: SignatureProbe, last: bool) -> None:
        self.probe, self.last = probe, last

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if not self.probe.active:
            return
        self.probe.parts.append(signature_moments(args[0]))
        if self.last:
            raise _StopProbe


class SignatureProbe:
    """Runs a model up to the last of its signature layers and returns one signature row per image."""

    def __init__(self) -> None:
        self.active = False
        self.parts: list[torch.Tensor] = []

    def attach(self, layers: list[nn.Module]) -> list:
        return [m.register_forward_pre_hook(_SignatureHook(self, i == len(layers) - 1)) for i, m in enumerate(layers)]

    def __call__(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        self.parts, self.active = [], True
        try:
            model(x)
        except _StopProbe:
            pass
        finally:
            self.active = False
        return torch.cat(self.parts, 1)


def signature_moments(x: torch.Tensor) -> torch.Tensor:
    """Per image: each channel's spatial mean and log-std (inputs without spatial extent: the values themselves).

    Example:
        >>> signature_moments(torch.ones(2, 3, 4, 4)).shape  # 3 means and 3 log-stds per image
        torch.Size([2, 6])
    """
    if x.ndim <= 2:
        return x.detach().float().reshape(x.shape[0], -1)
    mean, var, _ = image_moments(x)
    return torch.cat([mean.float(), 0.5 * torch.log(var.float() + _EPS)], 1)


@torch.no_grad()
def image_signatures(
    model: nn.Module,
    images,
    layers: Iterable[str],
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Each image's signature: channel means and log-stds of the inputs of BN ``layers`` in eval mode, (N, D).

    The model runs only up to the last of ``layers``; it is left as it was (hooks removed, modes restored).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4))
        >>> image_signatures(net, torch.rand(5, 3, 8, 8), ["1", "3"]).shape  # 2 layers x 4 channels x (mean, log-std)
        torch.Size([5, 16])
    """
    found = dict(bn_layers(model))
    names = list(layers)
    missing = [n for n in names if n not in found]
    if missing or not names:
        raise ValueError(f"expected BN layer names of the model for the signature, got {missing or 'none'}")
    device = model_device(model, device)
    probe = SignatureProbe()
    handles = probe.attach([found[n] for n in names])
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        rows = [probe(model, b.to(device)).cpu() for b in iter_batches(to_float_nchw(images), batch_size)]
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.train(mode)
    return torch.cat(rows)


def gaussian_scores(sig: torch.Tensor, mean: torch.Tensor, spread: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, E) scores of B signatures against E entries of a diagonal Gaussian: the negative log-likelihood in nats
    (without its constant) that picks an entry, and the normalised squared distance mean(z^2) that decides the
    fallback (about 1 for an image of the entry's own condition, whatever the entry's spread). The pooled covariance
    is this on whitened signatures with unit spread."""
    spread = spread.clamp_min(_MIN_SPREAD)
    z2 = ((sig[:, None, :] - mean[None]) / spread[None]).square()
    return 0.5 * z2.sum(-1) + spread.log().sum(-1)[None], z2.mean(-1)


def whitener(cov: torch.Tensor) -> torch.Tensor:
    """W with ``W @ cov @ W.T = I`` (the inverse Cholesky factor), after a ridge of the spread floor squared."""
    eye = torch.eye(cov.shape[0], dtype=torch.float64)
    chol = torch.linalg.cholesky(cov.double() + _MIN_SPREAD**2 * eye)
    return torch.linalg.solve_triangular(chol, eye, upper=False).float()


# --- the bank ---


@dataclass
class Bank:
    """BN statistics and signatures of named conditions, with the fallback thresholds calibrated when it was built.

    ``stats``: condition -> statistics of every BN layer (``clean`` holds the source model's own);
    ``signature_mean``/``signature_std``: condition -> (D,) mean and spread over its build images of the per-image
    signature of ``signature_layers``; ``covariance``: (D, D) within-condition covariance of the signature, pooled
    over all conditions; ``thresholds``: per way of scoring (:data:`COVARIANCES`), the ``quantile`` of the build
    images' normalised distances to their own entry (images the entry was not estimated from, when there were any);
    ``info``: n, seed, model, ...

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        >>> bank = build_bank(net, {"clean": torch.rand(8, 3, 8, 8), "dark": torch.rand(8, 3, 8, 8) / 4}, n=4)
        >>> bank.conditions, bank.layers
        (['clean', 'dark'], ['1'])
    """

    stats: dict[str, BNStats]
    signature_mean: dict[str, torch.Tensor]
    signature_std: dict[str, torch.Tensor]
    signature_layers: list[str]
    covariance: torch.Tensor
    thresholds: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def conditions(self) -> list[str]:
        return list(self.stats)

    @property
    def layers(self) -> list[str]:
        return self.stats[CLEAN].names

    def check_fits(self, model: nn.Module) -> None:
        """Raise a ValueError unless ``model`` has exactly this bank's BN layers, in order, with the same channels."""
        names = [n for n, _ in bn_layers(model)]
        if names != self.layers:
            diff = sorted(set(names) ^ set(self.layers))[:3] or "their order"
            raise ValueError(
                f"expected a model with the bank's {len(self.layers)} BN layers, got one with {len(names)} "
                f"(differing: {diff}); was the bank built for another model (it was built for "
                f"{self.info.get('model')!r})?"
            )
        self.stats[CLEAN].check_fits(model)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the bank as one safetensors file (tensors + JSON header in its metadata), atomically."""
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        for c, st in self.stats.items():
            for n in self.layers:
                tensors[f"{c}/{n}/mean"] = st.mean[n].float().contiguous()
                tensors[f"{c}/{n}/var"] = st.var[n].float().contiguous()
            tensors[f"{c}/{_SIG}/mean"] = self.signature_mean[c].float().contiguous()
            tensors[f"{c}/{_SIG}/std"] = self.signature_std[c].float().contiguous()
        tensors[_COV] = self.covariance.float().contiguous()
        head = {
            "conditions": self.conditions,
            "layers": self.layers,
            "signature_layers": self.signature_layers,
            "thresholds": self.thresholds,
            "info": self.info,
        }
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"format": _FORMAT, "bank": json.dumps(head)})

    @classmethod
    def load(cls, path: str | os.PathLike[str], model: nn.Module | None = None) -> Bank:
        """Read a bank written by :meth:`save`, refusing damaged values; with ``model``, check that it fits it.

        Example:
            >>> import tempfile
            >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
            >>> f = Path(tempfile.mkdtemp()) / "bank.safetensors"
            >>> build_bank(net, {"clean": torch.rand(8, 3, 8, 8)}, n=4).save(f)
            >>> Bank.load(f, net).conditions
            ['clean']
        """
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"expected a bank .safetensors file (from bnadapt bank build), got none at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != _FORMAT:
                    raise ValueError(f"expected a bnadapt bank file ({_FORMAT}), got format {meta.get('format')!r}")
                conditions, layers, sig_layers, thresholds, info = _check_head(json.loads(meta["bank"]))
                keys = set(f.keys())

                def get(key: str) -> torch.Tensor:
                    if key not in keys:
                        raise ValueError(f"expected the tensor {key!r} that the file's header lists, found none")
                    return f.get_tensor(key).float()

                stats, sig_mean, sig_std = {}, {}, {}
                for c in conditions:
                    st = BNStats(mean={}, var={})
                    for n in layers:
                        st.mean[n], st.var[n] = get(f"{c}/{n}/mean"), get(f"{c}/{n}/var")
                        check_layer_values(f"{c}/{n}", st.mean[n], st.var[n])
                    stats[c] = st
                    sig_mean[c], sig_std[c] = get(f"{c}/{_SIG}/mean"), get(f"{c}/{_SIG}/std")
                    _check_signature(c, sig_mean[c], sig_std[c], sig_mean[conditions[0]])
                for c in conditions:
                    for n in layers:
                        if stats[c].mean[n].shape != stats[conditions[0]].mean[n].shape:
                            raise ValueError(f"expected every condition to have the same channels in layer {n!r}")
                cov, d = get(_COV), len(sig_mean[conditions[0]])
                if cov.shape != (d, d) or not torch.isfinite(cov).all() or not torch.equal(cov, cov.T):
                    raise ValueError(
                        f"expected a finite symmetric {d}x{d} pooled covariance, got shape {tuple(cov.shape)} (or NaN, "
                        "inf, asymmetry); the file is damaged or was not written by bnadapt"
                    )
        except (SafetensorError, json.JSONDecodeError, KeyError, OSError) as e:
            raise ValueError(f"expected a readable bnadapt bank file at {path}, got an unreadable one ({e})") from e
        bank = cls(stats, sig_mean, sig_std, sig_layers, cov, thresholds, info)
        if model is not None:
            bank.check_fits(model)
        return bank


def _check_head(head: Any) -> tuple[list[str], list[str], list[str], dict[str, float], dict]:
    """The fields of a bank file's JSON header, or a ValueError saying which one is wrong."""
    if not isinstance(head, dict):
        raise ValueError(f"expected the bank header to be a JSON object, got {type(head).__name__}")
    conditions, layers, sig = head.get("conditions"), head.get("layers"), head.get("signature_layers")
    for key, value in (("conditions", conditions), ("layers", layers), ("signature_layers", sig)):
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise ValueError(f"expected the bank header's {key!r} to be a non-empty list of names, got {value!r:.80}")
    assert isinstance(conditions, list) and isinstance(layers, list) and isinstance(sig, list)  # for mypy
    if CLEAN not in conditions:
        raise ValueError(f"expected a {CLEAN!r} condition in the bank (the source fallback), got {conditions[:5]}")
    if sig != layers[: len(sig)]:
        raise ValueError(f"expected the signature layers to be the first BN layers, got {sig[:3]}")
    thresholds, info = head.get("thresholds"), head.get("info", {})
    if (
        not isinstance(thresholds, dict)
        or set(thresholds) != set(COVARIANCES)
        or not all(
            not isinstance(t, bool) and isinstance(t, (int, float)) and 0 < t < math.inf for t in thresholds.values()
        )
    ):
        raise ValueError(
            f"expected positive finite fallback thresholds for {', '.join(COVARIANCES)} in the bank header, got "
            f"{thresholds!r:.80}"
        )
    if not isinstance(info, dict):
        raise ValueError(f"expected the bank header's 'info' to be a JSON object, got {info!r:.60}")
    return conditions, layers, sig, {k: float(v) for k, v in thresholds.items()}, info


def _check_signature(name: str, mean: torch.Tensor, std: torch.Tensor, first: torch.Tensor) -> None:
    if mean.ndim != 1 or mean.shape != std.shape or mean.shape != first.shape:
        raise ValueError(
            f"expected 1-D signature mean and std of {tuple(first.shape)} values for condition {name!r}, got "
            f"{tuple(mean.shape)} and {tuple(std.shape)}"
        )
    if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std >= 0).all()):
        raise ValueError(
            f"expected a finite signature with non-negative spread for condition {name!r}, got NaN, inf or negative "
            "values; the file is damaged or was not written by bnadapt"
        )


def build_bank(
    model: nn.Module,
    conditions: Mapping[str, Any],
    n: int = 64,
    seed: int = 0,
    k_signature: int = 3,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    quantile: float = 0.99,
    info: Mapping[str, Any] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> Bank:
    """Build a bank: per condition, BN statistics and signature of ``n`` of its images (a seeded draw).

    Args:
        model: the source model (left unchanged).
        conditions: name -> images (uint8 NHWC or float NCHW), e.g. ``{"clean": ..., "fog:3": ...}``; ``clean`` is
            required: its entry keeps the model's own statistics (the fallback) and gets a signature of its images.
        n: images per condition for the statistics and the signature (>= 2).
        seed: seed of the draw of those images.
        k_signature: the signature reads the inputs of the first k BN layers (all of them if the model has fewer).
        batch_size: micro-batch (results do not depend on it); device: where to run (default: the model's).
        quantile: the fallback thresholds are this quantile of build images' distances to their own entry, measured
            on up to n images per condition that were not drawn (on the drawn ones when there are no others).
        info: extra JSON-able facts to record (data, command, ...); the model's name goes under ``"model"``.
        progress: called after each condition with (done, total, name).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4))
        >>> bank = build_bank(net, {"clean": torch.rand(20, 3, 8, 8), "bright": torch.rand(20, 3, 8, 8) + 1}, n=8)
        >>> bank.signature_layers, tuple(bank.signature_mean["bright"].shape)
        (['1', '3'], (16,))
    """
    layers = [name for name, _ in bn_layers(model)]
    k_signature = _check_build(layers, conditions, n, k_signature, quantile)
    names = list(conditions)
    sig_layers = layers[:k_signature]
    stats: dict[str, BNStats] = {}
    sig_mean: dict[str, torch.Tensor] = {}
    sig_std: dict[str, torch.Tensor] = {}
    centred, held_out = [], []
    for i, name in enumerate(names):
        stats[name], sig, held = _condition_entry(
            model, name, conditions[name], n, seed, sig_layers, batch_size, device
        )
        sig_mean[name], sig_std[name] = sig.mean(0), sig.std(0)
        centred.append(sig - sig_mean[name])
        held_out.append(sig if held is None else held)
        log.info("bank: %s (%d of %d)", name, i + 1, len(names))
        if progress is not None:
            progress(i + 1, len(names), name)
    within = torch.cat(centred).double()
    covariance = within.T @ within / (len(within) - len(names))
    covariance = ((covariance + covariance.T) / 2).float()  # exactly symmetric, as loading checks
    thresholds = _thresholds(names, held_out, sig_mean, sig_std, covariance, quantile)
    meta = {
        "n": n,
        "seed": seed,
        "k_signature": k_signature,
        "quantile": quantile,
        "bnadapt_version": __version__,
        "model": type(model).__name__,
        **(info or {}),
    }
    return Bank(stats, sig_mean, sig_std, sig_layers, covariance, thresholds, meta)


def _check_build(layers: list[str], conditions: Mapping[str, Any], n, k_signature, quantile: float) -> int:
    """Refuse bad build arguments; return k_signature capped at the number of BN layers."""
    if not layers:
        raise ValueError("expected a model with BatchNorm layers (with running statistics), got none to build from")
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"expected n >= 2 images per condition (a spread needs two), got {n!r}")
    if isinstance(k_signature, bool) or not isinstance(k_signature, int) or k_signature < 1:
        raise ValueError(f"expected k_signature >= 1 BN layers for the signature, got {k_signature!r}")
    if not 0 < quantile <= 1:
        raise ValueError(f"expected a quantile in (0, 1] for the fallback threshold, got {quantile}")
    names = list(conditions)
    bad = [c for c in names if not isinstance(c, str) or not c or "/" in c or c != c.strip() or c.startswith("#")]
    if bad:
        raise ValueError(f"expected condition names without '/', a leading '#' or surrounding spaces, got {bad[0]!r}")
    if CLEAN not in names:
        raise ValueError(f"expected a {CLEAN!r} condition (clean images, for the source fallback), got {names[:5]}")
    return min(k_signature, len(layers))  # a model with fewer BN layers: all of them


def _condition_entry(model: nn.Module, name: str, images, n: int, seed: int, sig_layers: list[str], batch_size, device):
    """One condition's statistics, the signatures of its n drawn images, and those of up to n others (None when the
    condition has no others)."""
    x = to_float_nchw(images)
    if len(x) < n:
        raise ValueError(f"expected at least n={n} images of condition {name!r}, got {len(x)}; lower n")
    drawn = sample_indices(len(x), n, seed)
    xs = x[torch.from_numpy(drawn)]
    own = name == CLEAN  # the source statistics: better than any estimate from n clean images
    stats = BNStats.from_model(model) if own else estimate_stats(model, xs, None, batch_size, device)
    sig = image_signatures(model, xs, sig_layers, batch_size, device)
    # The thresholds must hold for images the entry never saw, so they are measured on others where there are any.
    rest = np.setdiff1d(np.arange(len(x)), drawn)
    if not len(rest):
        return stats, sig, None
    others = x[torch.from_numpy(rest[spread_indices(len(rest), n)])]
    return stats, sig, image_signatures(model, others, sig_layers, batch_size, device)


def _thresholds(names, held_out, sig_mean, sig_std, covariance: torch.Tensor, quantile: float) -> dict[str, float]:
    """Per way of scoring, the ``quantile`` of the held-out signatures' normalised distances to their own entry."""
    whiten = whitener(covariance)
    distances: dict[str, list[torch.Tensor]] = {"pooled": [], "diagonal": []}
    for name, sig in zip(names, held_out, strict=True):
        mean = sig_mean[name][None]
        distances["diagonal"].append(gaussian_scores(sig, mean, sig_std[name][None])[1][:, 0])
        distances["pooled"].append(gaussian_scores(sig @ whiten.T, mean @ whiten.T, torch.ones_like(mean))[1][:, 0])
    return {k: float(torch.quantile(torch.cat(v).double(), quantile)) for k, v in distances.items()}


class _CellImages(Mapping[str, np.ndarray]):
    """Condition label -> up to 2n images of that benchmark cell (a seeded draw), read when asked for."""

    def __init__(self, data: BenchData, n: int, seed: int) -> None:
        self.data, self.n, self.seed = data, n, seed
        self.cells = {str(c): c for c in data.cells}

    def __getitem__(self, key: str) -> np.ndarray:
        images = self.data.cell(*self.cells[key])
        # n for the entry and up to n others for the threshold: on-the-fly corruption is paid for 2n images only.
        return images.get(sample_indices(len(images), min(len(images), 2 * self.n), self.seed))

    def __iter__(self) -> Iterator[str]:
        return iter(self.cells)

    def __len__(self) -> int:
        return len(self.cells)


def build_bank_from_data(
    model: nn.Module,
    data: BenchData,
    n: int = 64,
    seed: int = 0,
    k_signature: int = 3,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    model_name: str | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> Bank:
    """:func:`build_bank` over the cells of benchmark data (:func:`bnadapt.data.open_data`): one condition per cell,
    named ``clean`` or ``<corruption>:<severity>``; the data must have a clean cell.

    Example:
        >>> import tempfile
        >>> from bnadapt.data import open_data
        >>> from bnadapt.models import cifar_resnet
        >>> f = Path(tempfile.mkdtemp()) / "c.npz"
        >>> np.savez(f, x=np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), np.uint8), y=np.arange(8))
        >>> build_bank_from_data(cifar_resnet(20), open_data(f"generate:cifar:{f}", ["fog"], [5]), n=4).conditions
        ['clean', 'fog:5']
    """
    if (CLEAN, 0) not in data.cells:
        raise ValueError(
            f"expected clean images in the data for the bank's source entry, got only corrupted cells of "
            f"{data.spec}; pass --clean with a clean .npz or class folder"
        )
    info = {
        "model": model_name or type(model).__name__,
        "data": str(data.spec),
        "corrupt_seed": data.seed,
        "limit_per_cell": data.limit,
    }
    images = _CellImages(data, n, seed)
    return build_bank(model, images, n, seed, k_signature, batch_size, device, info=info, progress=progress)
