"""The method registry after the renovation: MethodSpec, option aliases, shardable, reset() of online models."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import bnadapt
from bnadapt.adapt import method_spec, resolve_aliases
from bnadapt.benchmark import BenchConfig
from bnadapt.bn import BNStats, batch_var_mean
from bnadapt.data import Cell, DataSpec
from bnadapt.methods import Resettable, reset
from conftest import SHARED, make_tiny


def _images(n: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 0.6 + 0.2


class _Alone:
    """The reducer of one process: the combined batch is the batch itself."""

    def moments(self, x):
        count, var, mean = batch_var_mean(x.double())
        return count, mean, var * count

    def images(self, count):
        return count


def test_every_method_has_a_spec_and_knobs_are_options():
    assert [method_spec(m).name for m in bnadapt.method_names()] == bnadapt.method_names()
    assert bnadapt.method_spec("prior").options == {"prior": 16.0, "order": "sequential"}
    assert bnadapt.method_spec("ema").options == {"momentum": 0.1}
    online = [m for m in bnadapt.method_names() if method_spec(m).online]
    assert online == ["test-batch", "ema", "bank", "tent", "rbn", "dua"]


def test_prior_keyword_and_option_are_the_same_knob(tiny):
    x = _images()
    by_keyword = BNStats.from_model(bnadapt.adapt(tiny, x, method="prior", prior=4.0))
    by_option = BNStats.from_model(bnadapt.adapt(tiny, x, method="prior", options={"prior": 4}))
    default = BNStats.from_model(bnadapt.adapt(tiny, x, method="prior"))
    for n in by_keyword.names:
        assert torch.equal(by_keyword.mean[n], by_option.mean[n])
    assert not torch.equal(by_keyword.mean["bn1"], default.mean["bn1"])
    with pytest.raises(ValueError, match="one value for prior"):
        bnadapt.adapt(tiny, x, method="prior", prior=4.0, options={"prior": 8.0})
    # An alias a method does not declare is ignored by it, but its value is still checked.
    assert resolve_aliases("replace", {}, prior=4.0) == {}
    with pytest.raises(ValueError, match="N >= 0"):
        bnadapt.adapt(tiny, x, method="replace", prior=-1.0)
    with pytest.raises(ValueError, match=r"momentum in \(0, 1\]"):
        bnadapt.adapt(tiny, method="ema", options={"momentum": 0})


def test_bench_fingerprint_is_the_same_for_both_spellings_of_prior():
    from bnadapt.benchmark import _header

    data = SimpleNamespace(spec=DataSpec("generate", Path("x.npz"), "cifar"), seed=0, missing=[])

    def fingerprint(**kw):
        config = BenchConfig(methods=("source", "prior"), **kw)
        return _header({}, data, config, None, torch.device("cpu"))["fingerprint"]

    assert fingerprint()["prior"] == 16.0 and "options" not in fingerprint()
    assert fingerprint(prior=8.0) == fingerprint(options={"prior": "8"})
    assert fingerprint(prior=8.0)["prior"] == 8.0 and "options" not in fingerprint(prior=8.0)
    with pytest.raises(ValueError, match="one value for prior"):
        BenchConfig(methods=("prior",), prior=8.0, options={"prior": 4.0}).validate()
    with pytest.raises(TypeError):
        BenchConfig(("source",))  # keywords only


def test_shardable_follows_the_options(tiny):
    assert method_spec("replace").can_shard({})
    assert method_spec("prior").can_shard({"prior": 16.0, "order": "independent"})
    assert not method_spec("prior").can_shard({"prior": 16.0, "order": "sequential"})
    assert not method_spec("sequential").can_shard({})
    x = _images()
    combined = BNStats.from_model(bnadapt.adapt(tiny, x, method="replace", reducer=_Alone()))
    plain = BNStats.from_model(bnadapt.adapt(tiny, x, method="replace"))
    for n in plain.names:
        torch.testing.assert_close(combined.var[n], plain.var[n], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="split over processes"):
        bnadapt.adapt(tiny, x, method="prior", options={"order": "sequential"}, reducer=_Alone())


@pytest.mark.parametrize("method", ["test-batch", "ema", "tent"])
def test_reset_returns_an_online_model_to_what_adapt_returned(one_thread, method):
    net = make_tiny().eval()
    warm = _images(8, seed=1) if method != "test-batch" else None
    model = bnadapt.adapt(net, warm, method=method, options={"lr": 0.05} if method == "tent" else None)
    fresh = copy.deepcopy(model)
    probe = _images(8, seed=2)
    with torch.no_grad():
        expected = fresh(probe)
    for seed in (3, 4, 5):  # a stream that moves its state
        model(_images(8, seed=seed) * 2)
    assert reset(model) is model
    with torch.no_grad():
        assert torch.equal(model(probe), expected)
    assert isinstance(model, Resettable) == (method == "tent")


def test_bank_model_reset(tmp_path):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4)).eval()
    bank = bnadapt.build_bank(net, {"clean": torch.rand(20, 3, 8, 8), "bright": torch.rand(20, 3, 8, 8) + 3}, n=8)
    selector = bnadapt.BankModel(copy.deepcopy(net), bank).eval()
    source = BNStats.from_model(selector.model)
    selector(torch.rand(2, 3, 8, 8) + 3)
    assert selector.counts["bright"] == 1
    selector.reset()
    assert selector.counts["bright"] == 0 and selector.last is None
    after = BNStats.from_model(selector.model)
    assert all(torch.equal(after.mean[n], source.mean[n]) for n in source.names)


def test_cell_text_round_trip():
    assert Cell.parse("fog:3") == ("fog", 3) and str(Cell("fog", 3)) == "fog:3"
    assert str(Cell.parse("clean")) == "clean" and Cell.parse("clean").severity == 0
    for bad in ("fog", "fog:0", "fog:6", ":3", "fog:x"):
        with pytest.raises(ValueError, match="expected a cell"):
            Cell.parse(bad)


def test_moved_modules_keep_their_old_import_paths():
    from bnadapt.bank_model import BankModel
    from bnadapt.shrink import auto_weights, equivalent_prior
    from bnadapt.tent import Tent

    assert BankModel is bnadapt.BankModel and Tent is bnadapt.Tent
    assert equivalent_prior(0.5, 32) == 32.0 and callable(auto_weights)


def test_import_bnadapt_has_no_cycle_at_runtime():
    # Each module imported first (bnadapt dropped from sys.modules before each): an import cycle shows up as a
    # partially initialised module. One fresh interpreter, so torch is imported once.
    modules = ["bnadapt.bn", "bnadapt.adapt", "bnadapt.methods", "bnadapt.cli", "bnadapt.corruptions"]
    modules += ["bnadapt.data", "bnadapt.benchmark", "bnadapt.bank", "bnadapt.errors", "bnadapt.distributed"]
    script = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    for m in [m for m in sys.modules if m == 'bnadapt' or m.startswith('bnadapt.')]:\n"
        "        del sys.modules[m]\n"
        "    importlib.import_module(name)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-600:]


@pytest.mark.shared
def test_structure_figures_hold():
    tool = SHARED / "tools" / "check_structure.py"
    if not tool.is_file():
        pytest.skip(f"no structure checker at {tool}")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(tool), str(root)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout
