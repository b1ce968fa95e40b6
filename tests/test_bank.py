"""The statistics bank: build, safetensors round trip, per-batch selection down to one image, fallback, CLI."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from bnadapt import BNStats, adapt, bn_layers
from bnadapt.bank import FALLBACK, Bank, build_bank, image_signatures
from bnadapt.cli import main
from bnadapt.methods.bank import BankModel
from bnadapt.results import read_results
from conftest import make_tiny

# Synthetic conditions: the same kind of content, scaled and offset differently (as brightness or contrast would).
SHIFTS = {"clean": (1.0, 0.0), "dark": (0.3, 0.0), "bright": (0.5, 0.6), "washed": (0.2, 0.8)}


def _images(cond: str, n: int, seed: int) -> torch.Tensor:
    scale, offset = SHIFTS[cond]
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * scale + offset


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bank() -> Bank:
    return build_bank(make_tiny(), {c: _images(c, 40, seed=i) for i, c in enumerate(SHIFTS)}, n=16, seed=0)


@pytest.fixture
def bank_file(tmp_path, bank):
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    return path


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_round_trip_is_exact(bank, bank_file, tiny):
    loaded = Bank.load(bank_file, tiny)
    assert loaded.conditions == list(SHIFTS) and loaded.layers == ["bn1", "bn2", "bn3"]
    assert loaded.signature_layers == ["bn1", "bn2", "bn3"] and loaded.thresholds == bank.thresholds
    assert torch.equal(loaded.covariance, bank.covariance) and loaded.covariance.shape == (60, 60)
    assert loaded.info == bank.info and loaded.info["n"] == 16 and loaded.info["k_signature"] == 3
    assert loaded.info["bnadapt_version"] and loaded.info["model"] == "TinyNet"
    for c in SHIFTS:
        assert all(torch.equal(loaded.stats[c].mean[n], bank.stats[c].mean[n]) for n in bank.layers)
        assert all(torch.equal(loaded.stats[c].var[n], bank.stats[c].var[n]) for n in bank.layers)
        assert torch.equal(loaded.signature_mean[c], bank.signature_mean[c])
        assert torch.equal(loaded.signature_std[c], bank.signature_std[c])
    from safetensors import safe_open

    with safe_open(str(bank_file), framework="pt") as f:
        keys = set(f.keys())
        assert "dark/bn2/var" in keys and "dark/#signature/std" in keys
        assert json.loads(f.metadata()["bank"])["conditions"] == list(SHIFTS)


def test_entries_hold_estimates_and_clean_holds_the_source(bank, tiny):
    src = BNStats.from_model(tiny)
    assert all(torch.equal(bank.stats["clean"].var[n], src.var[n]) for n in src.names)
    # Signature: bn1 (8 channels) and bn2 (16) give a mean and a log-std each, the BatchNorm1d bn3 its 12 values.
    assert bank.signature_mean["dark"].shape == (2 * 8 + 2 * 16 + 12,)
    sig = image_signatures(tiny, _images("dark", 3, seed=1), ["bn1"])
    expected = tiny.conv1(_images("dark", 3, seed=1))
    assert torch.allclose(sig[:, :8], expected.mean(dim=(2, 3)), atol=1e-6)


@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("covariance", ["pooled", "diagonal"])
def test_selector_picks_the_condition_of_the_batch(bank, bank_file, tiny, batch, covariance):
    for i, cond in enumerate(SHIFTS):
        model = adapt(tiny, method="bank", options={"bank": str(bank_file), "covariance": covariance})
        x = _images(cond, 32, seed=100 + i)  # images not used to build the bank
        with torch.no_grad():
            for k in range(0, 32, batch):
                model(x[k : k + batch])
        # A clean image beyond the threshold falls back to the source statistics, which the clean entry holds too.
        right = model.counts[cond] + (model.counts[FALLBACK] if cond == "clean" else 0)
        assert right == 32 // batch, (cond, model.counts)
        got = BNStats.from_model(model.model)
        assert all(torch.equal(got.mean[n], bank.stats[cond].mean[n]) for n in got.names)
        assert all(torch.equal(got.var[n], bank.stats[cond].var[n]) for n in got.names)


def test_output_equals_the_model_with_the_entry_applied(bank, bank_file, tiny):
    model = adapt(tiny, method="bank", options={"bank": str(bank_file)})
    oracle = bank.stats["bright"].apply_to(copy.deepcopy(tiny))
    x = _images("bright", 4, seed=7)
    with torch.no_grad():
        assert torch.equal(model(x), oracle(x)) and model.last == "bright"


def test_images_choose_alone_and_auto_tells_a_mixed_batch(bank_file, tiny, monkeypatch):
    x = torch.stack([_images(c, 8, seed=50 + i)[k] for k in range(8) for i, c in enumerate(SHIFTS)])  # interleaved
    opts = {"bank": str(bank_file)}
    alone = adapt(tiny, method="bank", options=opts)
    per_image = adapt(tiny, method="bank", options={**opts, "assign": "image"})
    with torch.no_grad():
        expected = torch.cat([alone(x[k : k + 1]) for k in range(len(x))])
        got = per_image(x)
    assert torch.allclose(got, expected, atol=1e-5)  # one forward per chosen entry = each image on its own
    assert per_image.counts == alone.counts and sum(per_image.counts.values()) == len(x)
    assert sum(per_image.counts[c] for c in SHIFTS) >= 24  # most images find their own condition
    batch = adapt(tiny, method="bank", options=opts)
    auto = adapt(tiny, method="bank", options={**opts, "assign": "auto"})
    with torch.no_grad():
        one = _images("bright", 16, seed=8)
        assert torch.equal(auto(one), batch(one)) and auto.counts == batch.counts  # one condition: one choice
        # Four conditions in equal shares agree at most 1/4 with any one choice: below a threshold of 1/2, each image
        # chooses alone.
        monkeypatch.setattr("bnadapt.methods.bank.AGREE", 0.5)
        assert torch.allclose(auto(x), expected, atol=1e-5)
    with pytest.raises(ValueError, match="assign=batch with mix=true"):
        adapt(tiny, method="bank", options={**opts, "assign": "image", "mix": True})
    with pytest.raises(ValueError, match="assign to be one of batch, image, auto"):
        adapt(tiny, method="bank", options={**opts, "assign": "each"})


def test_partial_forward_stops_at_the_last_signature_layer(tiny):
    bank = build_bank(tiny, {c: _images(c, 8, seed=i) for i, c in enumerate(SHIFTS)}, n=4, k_signature=1)
    model = BankModel(copy.deepcopy(tiny), bank).eval()
    calls = {"conv2": 0, "fc2": 0}
    for name in calls:
        getattr(model.model, name).register_forward_hook(lambda *a, k=name: calls.__setitem__(k, calls[k] + 1))
    with torch.no_grad():
        model(_images("dark", 2, seed=3))
    assert calls == {"conv2": 1, "fc2": 1}  # the probe stopped before conv2: only the full forward ran it


@pytest.mark.parametrize("covariance", ["pooled", "diagonal"])
def test_far_away_input_falls_back_to_source(bank_file, tiny, covariance):
    model = adapt(tiny, method="bank", options={"bank": str(bank_file), "covariance": covariance})
    far = _images("clean", 4, seed=9) * 40 - 20
    with torch.no_grad():
        model(_images("dark", 4, seed=9))  # first a known condition, so that the fallback has something to undo
        out = model(far)
        assert model.last == FALLBACK and model.counts[FALLBACK] == 1
        assert torch.equal(out, tiny(far))
    never = adapt(tiny, method="bank", options={"bank": str(bank_file), "fallback": float("inf")})
    with torch.no_grad():
        never(far)
    assert never.counts[FALLBACK] == 0


def test_single_image_under_inference_mode_and_callers_model_untouched(bank_file, tiny):
    before = _state(tiny)
    model = adapt(tiny, method="bank", options={"bank": str(bank_file)})
    with torch.inference_mode():
        logits = model(_images("washed", 1, seed=4))
        again = model(_images("dark", 1, seed=4))
    assert logits.shape == (1, 5) and again.shape == (1, 5) and torch.isfinite(logits).all()
    assert model.counts["washed"] == 1 and model.counts["dark"] == 1
    assert all(torch.equal(before[k], v) for k, v in tiny.state_dict().items())
    assert all(not layer._forward_pre_hooks for _, layer in bn_layers(tiny))
    assert model.model is not tiny


def test_deep_copies_select_on_their_own(bank_file, tiny):
    model = adapt(tiny, method="bank", options={"bank": str(bank_file)})
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin(_images("bright", 2, seed=5))
    assert twin.counts["bright"] == 1 and sum(model.counts.values()) == 0
    assert not torch.equal(twin.model.bn1.running_mean, model.model.bn1.running_mean)


def test_mix_weights_entries_by_temperature(bank, bank_file, tiny):
    x = _images("dark", 4, seed=6)
    sharp = adapt(tiny, method="bank", options={"bank": str(bank_file), "mix": True, "temperature": 1e-6})
    flat = adapt(tiny, method="bank", options={"bank": str(bank_file), "mix": True, "temperature": 1e15})
    with torch.no_grad():
        sharp(x)
        flat(x)
    assert torch.allclose(sharp.model.bn2.running_mean, bank.stats["dark"].mean["bn2"])
    average = torch.stack([bank.stats[c].mean["bn2"] for c in SHIFTS]).mean(0)
    assert torch.allclose(flat.model.bn2.running_mean, average, atol=1e-6)
    assert sharp.counts["dark"] == flat.counts["dark"] == 1


def test_clean_prior_shifts_the_clean_score_by_the_log_prior_ratio(bank_file, tiny):
    x = _images("dark", 2, seed=8)
    even, sure = (adapt(tiny, method="bank", options={"bank": str(bank_file), "clean_prior": p}) for p in (0.25, 0.9))
    (a, dist_a), (b, dist_b) = even.scores(x), sure.scores(x)
    # 4 entries: clean_prior 0.25 is the uniform prior; 0.9 leaves 0.1 / 3 to each other entry.
    assert abs(float(a[0] - b[0]) - np.log(0.9 / 0.25)) < 1e-2  # scores are ~1e4 nats in float32
    assert all(abs(float(v) - np.log(0.25 / (0.1 / 3))) < 1e-2 for v in b[1:] - a[1:])
    assert torch.equal(dist_a, dist_b) and sum(even.counts.values()) == 0  # scoring alone chooses nothing


def test_pooled_scores_whiten_the_shared_covariance(bank, tiny):
    model = BankModel(copy.deepcopy(tiny), bank, covariance="pooled")
    x = _images("washed", 3, seed=11)
    sig = image_signatures(tiny, x, bank.signature_layers).double()
    cov = bank.covariance.double() + 1e-6 * torch.eye(60, dtype=torch.float64)  # the ridge whitener() adds
    d = sig - bank.signature_mean["bright"].double()
    mahalanobis = torch.einsum("bi,ij,bj->b", d, torch.linalg.inv(cov), d)
    score, dist = model.scores(x)
    assert torch.allclose(dist[2].double(), mahalanobis.mean() / 60, rtol=1e-3)
    assert torch.allclose(score[2].double(), 0.5 * mahalanobis.mean() - np.log(0.5 / 3), rtol=1e-3)


def test_build_refuses_bad_input(tiny):
    with pytest.raises(ValueError, match="'clean' condition"):
        build_bank(tiny, {"dark": _images("dark", 8, 0)}, n=4)
    with pytest.raises(ValueError, match="n >= 2"):
        build_bank(tiny, {"clean": _images("clean", 8, 0)}, n=1)
    with pytest.raises(ValueError, match="at least n=16 images of condition 'dark'"):
        build_bank(tiny, {"clean": _images("clean", 20, 0), "dark": _images("dark", 8, 0)}, n=16)
    with pytest.raises(ValueError, match="without '/'"):
        build_bank(tiny, {"clean": _images("clean", 8, 0), "a/b": _images("dark", 8, 0)}, n=4)


def _damage(path, key, value):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    tensors[key] = value
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda p: p.unlink(), "name a bank file"),
        (lambda p: p.write_bytes(b"not a safetensors file"), "unreadable"),
        (lambda p: BNStats.from_model(make_tiny()).save(p), "expected a bnadapt bank file"),
        (lambda p: _damage(p, "dark/bn1/mean", torch.full((8,), float("nan"))), "NaN"),
        (lambda p: _damage(p, "bright/#signature/std", torch.full((60,), float("inf"))), "NaN"),
        (lambda p: _damage(p, "dark/bn2/var", torch.ones(3)), "matching 1-D"),
        (lambda p: _damage(p, "#pooled/covariance", torch.ones(60, 59)), "symmetric 60x60"),
    ],
)
def test_bad_bank_file_is_refused(bank_file, tiny, damage, match):
    damage(bank_file)
    with pytest.raises(ValueError, match=match):
        adapt(tiny, method="bank", options={"bank": str(bank_file)})


def test_bank_of_another_model_and_missing_option_are_refused(bank_file):
    from bnadapt.models import cifar_resnet

    with pytest.raises(ValueError, match="built for another model"):
        adapt(cifar_resnet(20), method="bank", options={"bank": str(bank_file)})
    with pytest.raises(ValueError, match="--opt bank=FILE"):
        adapt(make_tiny(), method="bank")
    with pytest.raises(ValueError, match="temperature"):
        adapt(make_tiny(), method="bank", options={"bank": str(bank_file), "mix": True, "temperature": 0.0})
    with pytest.raises(ValueError, match="covariance to be one of pooled, diagonal"):
        adapt(make_tiny(), method="bank", options={"bank": str(bank_file), "covariance": "full"})
    with pytest.raises(ValueError, match="clean_prior"):
        adapt(make_tiny(), method="bank", options={"bank": str(bank_file), "clean_prior": 1.0})


def test_cli_build_show_and_bench(tmp_path, resnet20_checkpoint, capsys):
    x = np.random.default_rng(0).integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "in.npz", x=x, y=np.arange(24) % 10)
    model = ["--model", "cifar10_resnet20", "--checkpoint", str(resnet20_checkpoint)]
    data = f"generate:cifar:{tmp_path / 'in.npz'}"
    build = ["bank", "build", *model, "--data", data, "--corruptions", "contrast", "fog", "--severities", "5", "--n",
             "8", "--out", str(tmp_path / "b.safetensors"), "--no-progress"]  # fmt: skip
    assert main(build) == 0
    assert "built a bank of 3 conditions" in capsys.readouterr().out
    assert main(["bank", "show", str(tmp_path / "b.safetensors")]) == 0
    assert "conditions: clean contrast:5 fog:5" in capsys.readouterr().out
    bench = ["bench", *model, "--data", data, "--corruptions", "contrast", "--severities", "5", "--methods",
             "source,bank", "--opt", f"bank={tmp_path / 'b.safetensors'}", "-b", "4", "--out", str(tmp_path / "r"),
             "--no-progress", "--no-plots"]  # fmt: skip
    assert main(bench) == 0
    rows = read_results(tmp_path / "r")[1]
    assert {(r["method"], r["corruption"]) for r in rows} == {(m, c) for m in ("source", "bank")
                                                              for c in ("clean", "contrast")}  # fmt: skip
    assert all(r["total"] == 24 for r in rows)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["bank", "show", "nope.safetensors"], "got none at nope.safetensors"),
        (["bank", "build", "--model", "cifar10_resnet20", "--data", "generate:cifar:x.npz", "--out", "b.pt"],
         ".safetensors"),
        (["bank"], "required: {build,show}"),
    ],
)  # fmt: skip
def test_cli_bad_input_one_line_exit_2(argv, match, capsys):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1


def test_bench_with_a_missing_bank_exits_2(tmp_path, resnet20_checkpoint, capsys):
    np.savez(tmp_path / "in.npz", x=np.zeros((4, 32, 32, 3), np.uint8), y=np.arange(4))
    argv = ["bench", "--model", "cifar10_resnet20", "--checkpoint", str(resnet20_checkpoint), "--data",
            f"npz:{tmp_path / 'in.npz'}", "--methods", "bank", "--opt", "bank=missing.safetensors", "--out",
            str(tmp_path / "r"), "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    assert "name a bank file" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # refused when the options were parsed, before anything was written


@pytest.mark.cuda
def test_selector_on_cuda_chooses_as_on_cpu(bank_file, tiny):
    cpu = adapt(tiny, method="bank", options={"bank": str(bank_file)})
    gpu = adapt(copy.deepcopy(tiny).cuda(), method="bank", options={"bank": str(bank_file)})
    x = _images("bright", 4, seed=12)
    with torch.inference_mode():
        a, b = cpu(x), gpu(x.cuda())
    assert gpu.last == cpu.last == "bright" and torch.allclose(a, b.cpu(), atol=1e-4)
