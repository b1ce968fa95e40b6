"""The ``bank`` method: a selector that gives every incoming batch, down to one image, the statistics of the
best-matching condition of a :class:`bnadapt.bank.Bank`, or the source statistics when nothing matches.

``adapt(model, method="bank", options={"bank": "bank.safetensors"})`` returns a :class:`BankModel`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapt import AdaptConfig, register_method
from ..bank import COVARIANCES, FALLBACK, Bank, SignatureProbe, gaussian_scores, whitener
from ..bn import BNStats, bn_layers, mix_stats
from ..data import CLEAN

__all__ = ["AGREE", "ASSIGN", "BankModel"]

ASSIGN = ("batch", "image", "auto")
# assign=auto: the least share of a batch's images whose own best entry is the batch's that still counts as one
# condition. Batches of 16 of one CIFAR-10-C condition agree at 8-98% (median 36%), those of a mixed stream of the 15
# corruptions at 3% (ResNet-20, the 46-entry bank; benchmarks/bank_assign.py, docs/results.md); set from that
# exploratory look.
AGREE = 0.1


class BankModel(nn.Module):
    """``model`` behind a bank's selector: each call picks BN statistics for its batch, then runs ``model``.

    Per call: the batch's signatures come from a forward of ``model`` with its source statistics that stops at the
    last signature layer. Every entry gets a score: the mean over the batch's images of the Gaussian negative
    log-likelihood in nats (``covariance``: ``"pooled"``, one within-condition covariance for all entries, or
    ``"diagonal"``, each entry's own spread), minus the log of its prior probability (``clean_prior`` for the clean
    entry, the rest shared evenly). The best entry's statistics (or, with ``mix``, the softmax mix with weights
    ``exp(-score / temperature)``) go into the selected BN ``layers`` (``part`` as in :func:`bnadapt.adapt`), unless
    the batch's mean normalised distance to that entry exceeds ``fallback`` times the bank's threshold: then the
    source statistics do (``fallback=inf``: never). ``assign`` says who gets one choice: ``"batch"`` (the whole
    batch, as above), ``"image"`` (each image its own best entry, scored and fallen back alone; the batch runs in one
    forward per chosen entry), or ``"auto"``: the batch's choice when at least :data:`AGREE` of its images would pick
    that entry alone, else each image its own (a batch drawn from many conditions, as in a mixed stream, agrees on
    no entry). ``counts`` maps each condition and ``"fallback"`` to how many choices picked it (one per call, or one
    per image when images choose); ``last`` is the last choice (per image: the most frequent in the call).

    Example:
        >>> import copy
        >>> from bnadapt.bank import build_bank
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4)).eval()
        >>> bank = build_bank(net, {"clean": torch.rand(20, 3, 8, 8), "bright": torch.rand(20, 3, 8, 8) + 3}, n=8)
        >>> selector = BankModel(copy.deepcopy(net), bank).eval()
        >>> _ = selector(torch.rand(1, 3, 8, 8) + 3)
        >>> selector.last, selector.counts["bright"]
        ('bright', 1)
    """

    def __init__(
        self,
        model: nn.Module,
        bank: Bank,
        layers: Iterable[str] | None = None,
        part: str = "both",
        mix: bool = False,
        temperature: float = 1.0,
        fallback: float = 1.0,
        covariance: str = "pooled",
        clean_prior: float = 0.5,
        assign: str = "batch",
    ) -> None:
        super().__init__()
        _check_settings(temperature, fallback, covariance, clean_prior, assign, mix)
        self.assign = assign
        bank.check_fits(model)
        self.model = model
        self.conditions = bank.conditions
        self.mix, self.temperature = bool(mix), float(temperature)
        self.limit = float(fallback) * bank.thresholds[covariance]
        found = dict(bn_layers(model))
        names = bank.layers if layers is None else list(layers)
        self._layers = [found[n] for n in names]  # a plain list: they are submodules of self.model already
        source = BNStats.from_model(model, names)
        rows = [mix_stats(source, _subset(bank.stats[c], names), 1.0, part) for c in self.conditions] + [source]
        for i, n in enumerate(names):  # buffers, so that .to(device) and deep copies carry them
            self.register_buffer(f"_mean{i}", torch.stack([r.mean[n] for r in rows]), persistent=False)
            self.register_buffer(f"_var{i}", torch.stack([r.var[n] for r in rows]), persistent=False)
        mean = torch.stack([bank.signature_mean[c] for c in self.conditions])
        spread = torch.stack([bank.signature_std[c] for c in self.conditions])
        # Pooled: scores are those of a unit diagonal Gaussian in whitened coordinates.
        whiten = whitener(bank.covariance) if covariance == "pooled" else torch.eye(mean.shape[1])
        self.register_buffer("_whiten", whiten, persistent=False)
        self.register_buffer("_sig_mean", mean @ whiten.T, persistent=False)
        self.register_buffer("_sig_std", spread if covariance == "diagonal" else torch.ones_like(spread), False)
        others = math.log((1 - clean_prior) / max(1, len(self.conditions) - 1))
        log_prior = [math.log(clean_prior) if c == CLEAN else others for c in self.conditions]
        self.register_buffer("_log_prior", torch.tensor(log_prior), persistent=False)
        self._pooled = covariance == "pooled"
        self._source_row = len(self.conditions)
        # The signature is defined with source statistics: selected signature layers get them back for the probe.
        self._sig_rows = [i for i, n in enumerate(names) if n in bank.signature_layers]
        self._probe = SignatureProbe()
        self._probe.attach([found[n] for n in bank.signature_layers])
        self._current: int | None = self._source_row  # the row every selected layer holds now (None: mixed)
        self.counts: dict[str, int] = {}
        self.last: str | None = None
        self.reset_counts()
        p = next(iter(model.buffers()), None)
        if p is not None:
            self.to(p.device)

    def reset_counts(self) -> None:
        """Set every selection count to 0."""
        self.counts = dict.fromkeys([*self.conditions, FALLBACK], 0)

    def reset(self) -> None:
        """Back to the state it was built in: source statistics in place, no selection counted."""
        self._set_row(self._source_row)
        self._current = self._source_row
        self.reset_counts()
        self.last = None

    def _buffers_of(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"_mean{i}"), getattr(self, f"_var{i}")

    @torch.no_grad()
    def _set_row(self, row: int, only: list[int] | None = None) -> None:
        for i in range(len(self._layers)) if only is None else only:
            mean, var = self._buffers_of(i)
            self._layers[i].running_mean.copy_(mean[row])
            self._layers[i].running_var.copy_(var[row])

    @torch.no_grad()
    def image_scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each image's score for each entry (lower is better) and its normalised distance to it, (B, E) each.

        Runs the partial forward (with the source statistics in the signature layers); sets nothing else.
        """
        if self._current != self._source_row and self._sig_rows:
            self._set_row(self._source_row, self._sig_rows)
            self._current = None
        sig = self._probe(self.model, x)
        if self._pooled:
            sig = sig @ self._whiten.T
        nll, dist = gaussian_scores(sig, self._sig_mean, self._sig_std)
        return nll - self._log_prior, dist

    def scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each entry's score for batch ``x`` (lower is better) and the batch's normalised distance to it, (E,) each."""
        score, dist = self.image_scores(x)
        return score.mean(0), dist.mean(0)

    @torch.no_grad()
    def select(self, x: torch.Tensor) -> str:
        """Score the entries for batch ``x``, put the chosen statistics in place and return the choice's name."""
        return self._select_batch(*self.scores(x))

    def _select_batch(self, score: torch.Tensor, dist: torch.Tensor) -> str:
        best = int(score.argmin())
        if not float(dist[best]) <= self.limit:  # NaN falls back too
            row, choice = self._source_row, FALLBACK
        elif self.mix:
            w = torch.softmax(-score / self.temperature, 0)
            for i, layer in enumerate(self._layers):
                mean, var = self._buffers_of(i)
                # The source row gets no weight: the mix is over the bank's entries.
                layer.running_mean.copy_(w @ mean[:-1])
                layer.running_var.copy_(w @ var[:-1])
            self._current = None
            return self._count(self.conditions[best])
        else:
            row, choice = best, self.conditions[best]
        if row != self._current:
            self._set_row(row)
            self._current = row
        return self._count(choice)

    def _count(self, choice: str) -> str:
        self.counts[choice] += 1
        self.last = choice
        return choice

    @torch.no_grad()
    def image_rows(self, x: torch.Tensor) -> torch.Tensor | None:
        """Per image of ``x``, the row of statistics it gets (None: one choice for the batch, already in place)."""
        score, dist = self.image_scores(x)
        batch_score, best = score.mean(0), score.argmin(1)
        if (
            self.assign == "batch"
            or self.assign == "auto"
            and float((best == batch_score.argmin()).float().mean()) >= AGREE
        ):
            self._select_batch(batch_score, dist.mean(0))
            return None
        own = dist.gather(1, best[:, None])[:, 0]
        rows = torch.where(own <= self.limit, best, torch.full_like(best, self._source_row))  # NaN falls back too
        names = [*self.conditions, FALLBACK]
        chosen = Counter(names[r] for r in rows.tolist())
        for name, k in chosen.items():
            self.counts[name] += k
        self.last = chosen.most_common(1)[0][0]  # ties: the first to appear in the batch
        return rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.shape[0]:
            return self.model(x)
        # Selection in float32 as at build time, also under autocast: a bf16 signature or mix would drift.
        with torch.autocast(x.device.type, enabled=False):
            rows = self.image_rows(x)
        if rows is None:
            return self.model(x)
        out = None
        for row in rows.unique().tolist():
            at = rows == row
            self._set_row(row)
            self._current = row
            y = self.model(x[at])
            if out is None:
                out = y.new_empty((len(x), *y.shape[1:]))
            out[at] = y
        return out


def _subset(stats: BNStats, names: list[str]) -> BNStats:
    return BNStats(mean={n: stats.mean[n] for n in names}, var={n: stats.var[n] for n in names})


def _check_settings(
    temperature: float, fallback: float, covariance: str, clean_prior: float, assign: str = "batch", mix: bool = False
) -> None:
    if assign not in ASSIGN:
        raise ValueError(f"expected the bank's option assign to be one of {', '.join(ASSIGN)}, got {assign!r}")
    if mix and assign != "batch":
        raise ValueError(f"expected assign=batch with mix=true (the mix is one per batch), got assign={assign}")
    if not 0 < temperature < math.inf:
        raise ValueError(f"expected a positive finite temperature for the bank's mix, got {temperature}")
    if not fallback >= 0:  # also refuses NaN; inf turns the fallback off
        raise ValueError(f"expected fallback >= 0 (times the bank's threshold; inf: never), got {fallback}")
    if covariance not in COVARIANCES:
        raise ValueError(f"expected covariance to be one of {', '.join(COVARIANCES)}, got {covariance!r}")
    if not 0 < clean_prior < 1:
        raise ValueError(f"expected clean_prior (the clean entry's prior probability) in (0, 1), got {clean_prior}")


def _check_options(opts: dict[str, Any]) -> None:
    """Refuse a missing bank file and bad values (called by the registry whenever options are parsed, so a
    benchmark refuses them before it writes anything)."""
    if not opts["bank"]:
        raise ValueError(
            "expected option bank=<file.safetensors> (written by bnadapt bank build) for method bank, got none; "
            "pass --opt bank=FILE"
        )
    if not Path(opts["bank"]).is_file():
        raise ValueError(
            f"expected option bank to name a bank file (from bnadapt bank build), got none at {opts['bank']}"
        )
    _check_settings(
        opts["temperature"], opts["fallback"], opts["covariance"], opts["clean_prior"], opts["assign"], opts["mix"]
    )


_OPTIONS = {
    "bank": "",
    "mix": False,
    "temperature": 1.0,
    "fallback": 1.0,
    "covariance": "pooled",
    "clean_prior": 0.5,
    "assign": "batch",
}


@register_method("bank", images="unused", online=True, options=_OPTIONS, check=_check_options)
def bank(model: nn.Module, images, cfg: AdaptConfig, layers: list[str]) -> nn.Module:
    """A :class:`BankModel` over the bank file named by option ``bank``."""
    opts = cfg.options  # checked by _check_options when adapt() parsed them
    return BankModel(
        model,
        Bank.load(opts["bank"], model),
        layers,
        cfg.part,
        mix=opts["mix"],
        temperature=opts["temperature"],
        fallback=opts["fallback"],
        covariance=opts["covariance"],
        clean_prior=opts["clean_prior"],
        assign=opts["assign"],
    )
