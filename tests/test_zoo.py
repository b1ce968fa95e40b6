"""The model zoo: RobustBench checkpoints offline, --num-classes, timm without a hub, models without BatchNorm."""

from __future__ import annotations

import functools
import hashlib
import socket

import numpy as np
import pytest
import torch
from torch import nn

from bnadapt import adapt, load_model
from bnadapt.cli import main
from bnadapt.results import read_results
from bnadapt.robustbench import checkpoint_state, entry, zoo_names

# The state-dict layout of RobustBench's own modules for each entry (their wide_resnet.py / resnext.py, built as their
# model_zoo/cifar10.py and cifar100.py build them, without the AugMix entries' mu/sigma buffers, which their files
# lack): number of entries, parameters, and sha256 of "key:shape" lines in order (first 16 hex digits).
THEIR_LAYOUT = {
    "cifar10/Standard": (155, 36_479_194, "26cfb3c4ebe07e55"),
    "cifar10/Hendrycks2020AugMix_WRN": (227, 2_243_546, "9a316fc42941f8a6"),
    "cifar10/Hendrycks2020AugMix_ResNeXt": (188, 6_807_882, "ee99f08dd0cd24e5"),
    "cifar100/Hendrycks2020AugMix_WRN": (227, 2_255_156, "029bbe2cbcd6d721"),
    "cifar100/Hendrycks2020AugMix_ResNeXt": (188, 6_900_132, "f7ca133b9250bfeb"),
}
# A few of their keys, spelled out, so a mismatch names what differs.
THEIR_KEYS = {
    "cifar10/Standard": {"block1.layer.0.convShortcut.weight": (160, 16, 1, 1), "fc.weight": (10, 640)},
    "cifar10/Hendrycks2020AugMix_WRN": {"block3.layer.5.conv2.weight": (128, 128, 3, 3), "bn1.running_var": (128,)},
    "cifar100/Hendrycks2020AugMix_ResNeXt": {
        "stage_1.0.downsample.0.weight": (256, 64, 1, 1),
        "stage_2.0.conv_conv.weight": (256, 64, 3, 3),
        "classifier.weight": (100, 1024),
    },
}


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Small tensors on a busy machine: torch's thread pool only spins (a WRN-40-2 forward 50x slower)."""


@functools.cache
def _random_net(spec: str) -> nn.Module:
    """The entry's network with random weights and non-trivial BN statistics (built once: WRN-28-10 is 36M)."""
    torch.manual_seed(0)
    e = entry(spec)
    net = e.build(e.num_classes)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.1, 0.1)
    return net.eval()


def _layout(net: nn.Module) -> tuple[int, int, str]:
    sd = net.state_dict()
    lines = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in sd.items())
    return len(sd), sum(p.numel() for p in net.parameters()), hashlib.sha256(lines.encode()).hexdigest()[:16]


def test_every_entry_has_their_layout():
    assert set(zoo_names()) == set(THEIR_LAYOUT)


@pytest.mark.parametrize("spec", list(THEIR_LAYOUT))
def test_state_dict_layout_is_robustbenchs(spec):
    net = _random_net(spec)
    sd = net.state_dict()
    for key, shape in THEIR_KEYS.get(spec, {}).items():
        assert tuple(sd[key].shape) == shape, key
    assert _layout(net) == THEIR_LAYOUT[spec]


def _save(tmp_path, spec: str, wrap: str) -> nn.Module:
    net = _random_net(spec)
    sd = net.state_dict()
    if wrap in ("module", "state_dict_module"):
        sd = {f"module.{k}": v for k, v in sd.items()}
    if wrap == "model":
        sd = {f"model.{k}": v for k, v in sd.items()}
    obj = {"state_dict": sd, "epoch": 90, "best_acc": 0.9} if wrap.startswith("state_dict") else sd
    dataset, name = spec.split("/")
    folder = tmp_path / "models" / dataset / "corruptions"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(obj, folder / f"{name}.pt")
    return net


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "module", "state_dict_module", "model"])
def test_augmix_wrn_checkpoint_wrappings_give_identical_logits(tmp_path, wrap):
    spec = "cifar10/Hendrycks2020AugMix_WRN"
    net = _save(tmp_path, spec, wrap)
    model = load_model(f"robustbench:{spec}", model_dir=tmp_path / "models")
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        # Their entry: (x - mu) / sigma with mu = sigma = 0.5 in front of the network.
        assert torch.equal(model(x), net((x - 0.5) / 0.5))
    assert not model.training and model.preprocessing["input_size"] == [3, 32, 32]
    assert model.preprocessing["checkpoint"].endswith("cifar10/corruptions/Hendrycks2020AugMix_WRN.pt")


def test_resnext_cifar100_loads_and_takes_mu_sigma_from_the_file(tmp_path):
    spec = "cifar100/Hendrycks2020AugMix_ResNeXt"
    net = _random_net(spec)
    sd = {**net.state_dict(), "mu": torch.full((1, 3, 1, 1), 0.4), "sigma": torch.full((1, 3, 1, 1), 0.25)}
    folder = tmp_path / "cifar100" / "corruptions"
    folder.mkdir(parents=True)
    torch.save({"state_dict": sd}, folder / "Hendrycks2020AugMix_ResNeXt.pt")
    model = load_model(f"robustbench:{spec}", model_dir=tmp_path)
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        out = model(x)
        assert out.shape == (2, 100) and torch.allclose(out, net((x - 0.4) / 0.25), rtol=0, atol=1e-5)
    assert model.preprocessing["mean"] == pytest.approx([0.4] * 3)


@pytest.mark.slow
def test_standard_wrn28_10_loads_unnormalised(tmp_path):
    net = _save(tmp_path, "cifar10/Standard", "state_dict_module")
    model = load_model("robustbench:cifar10/Standard", model_dir=tmp_path / "models")
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(model(x), net(x))  # Standard takes [0, 1] images as they are


def test_missing_file_says_where_to_put_it(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(socket.socket, "connect", lambda *a: calls.append(a))
    with pytest.raises(FileNotFoundError) as info:
        load_model("robustbench:cifar10/Standard", model_dir=tmp_path)
    text = str(info.value)
    assert "\n" not in text and str(tmp_path / "cifar10" / "corruptions" / "Standard.pt") in text
    assert "never downloads" in text and not calls


def test_bad_specs_refused_in_one_line(tmp_path):
    with pytest.raises(ValueError, match="cifar10/Standard, .*Hendrycks2020AugMix_WRN"):
        load_model("robustbench:cifar10/Nope")
    with pytest.raises(ValueError, match="--num-classes 10"):
        load_model("robustbench:cifar10/Hendrycks2020AugMix_WRN", pretrained=False, num_classes=100)
    with pytest.raises(ValueError, match="state dict of tensors"):
        checkpoint_state({"state_dict": {"fc.weight": 3}}, tmp_path / "x.pt")
    _save(tmp_path, "cifar10/Hendrycks2020AugMix_WRN", "plain")
    (tmp_path / "models" / "cifar10" / "corruptions" / "Hendrycks2020AugMix_WRN.pt").rename(
        tmp_path / "models" / "cifar10" / "corruptions" / "Hendrycks2020AugMix_ResNeXt.pt"
    )
    with pytest.raises(ValueError, match="missing .* unexpected"):  # the WRN's file under the ResNeXt's name
        load_model("robustbench:cifar10/Hendrycks2020AugMix_ResNeXt", model_dir=tmp_path / "models")


# --- --num-classes ---


def test_num_classes_torchvision_and_a_fine_tuned_checkpoint(tmp_path):
    net = load_model("torchvision:shufflenet_v2_x0_5", num_classes=7).net
    assert net.fc.out_features == 7
    torch.save(net.state_dict(), tmp_path / "ft.pt")
    m = load_model("torchvision:shufflenet_v2_x0_5", checkpoint=tmp_path / "ft.pt", num_classes=7)
    assert torch.equal(m.net.fc.weight, net.fc.weight)
    with pytest.raises(ValueError, match="fc.weight of shape"):  # without --num-classes the head does not fit
        load_model("torchvision:shufflenet_v2_x0_5", checkpoint=tmp_path / "ft.pt")
    with pytest.raises(ValueError, match="--num-classes 1000 with the IMAGENET1K_V1 weights"):
        load_model("torchvision:shufflenet_v2_x0_5", weights="IMAGENET1K_V1", num_classes=7)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            load_model("cifar10_resnet20", pretrained=False, num_classes=bad)


def test_cli_num_classes_loads_a_fine_tuned_timm_checkpoint(tmp_path, capsys):
    net = load_model("timm:test_resnet", num_classes=7).net
    torch.save(net.state_dict(), tmp_path / "ft.pt")
    x = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "imgs.npz", x=x)
    args = ["adapt", "--model", "timm:test_resnet", "--checkpoint", str(tmp_path / "ft.pt"), "--images"]
    args += [str(tmp_path / "imgs.npz"), "--out", str(tmp_path / "o.pt"), "--n", "8"]
    assert main([*args, "--num-classes", "7"]) == 0
    assert main(args) == 2  # the 1000-class head does not take the 7-class checkpoint
    assert "fc.weight of shape" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main([*args, "--num-classes", "0"])
    assert info.value.code == 2 and "expected a positive integer" in capsys.readouterr().err


# --- timm without a hub ---


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """Empty local caches and a network that records every connection attempt (and refuses it)."""
    from huggingface_hub import constants

    calls = []

    def refuse(self, *args):
        calls.append(args)
        raise OSError("network is off in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    hub = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "torch"))
    yield tmp_path, calls
    torch.hub.set_dir(hub)


def test_timm_weights_not_cached_fail_at_once_in_one_line(offline):
    tmp_path, calls = offline
    with pytest.raises(FileNotFoundError) as info:
        load_model("timm:test_resnet", weights="pretrained")
    text = str(info.value)
    assert "\n" not in text and "never downloads" in text and "timm/test_resnet.r160_in1k" in text
    assert not calls  # no connection was even attempted
    with pytest.raises(ValueError, match="timm model name"):
        load_model("timm:no_such_model")
    with pytest.raises(ValueError, match="pretrained weights"):
        load_model("timm:test_resnet.no_such_tag", weights="pretrained")


def test_timm_weights_read_from_the_hf_cache_without_network(offline):
    import safetensors.torch
    import timm

    tmp_path, calls = offline
    net = timm.create_model("test_resnet")
    snapshot = tmp_path / "hf" / "models--timm--test_resnet.r160_in1k" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    safetensors.torch.save_file(net.state_dict(), snapshot / "model.safetensors")
    m = load_model("timm:test_resnet", weights="pretrained")
    assert torch.equal(m.net.fc.weight, net.fc.weight) and not calls
    m = load_model("timm:test_resnet", weights="pretrained", num_classes=3)  # timm drops the pretrained head
    assert m.net.fc.out_features == 3 and torch.equal(m.net.conv1[0].weight, net.conv1[0].weight)


def test_timm_weights_read_from_torch_hubs_checkpoints_without_network(offline):
    import timm
    from timm.models import get_pretrained_cfg

    tmp_path, calls = offline
    net = timm.create_model("resnet10t")
    url = get_pretrained_cfg("resnet10t").url
    (tmp_path / "torch" / "checkpoints").mkdir(parents=True)
    torch.save(net.state_dict(), tmp_path / "torch" / "checkpoints" / url.rsplit("/", 1)[-1])
    m = load_model("timm:resnet10t", weights="pretrained")
    assert torch.equal(m.net.fc.weight, net.fc.weight) and not calls


# --- models without BatchNorm ---


def _vit() -> nn.Module:
    torch.manual_seed(0)
    return load_model("timm:test_vit")


def test_tent_learns_layernorm_affine_parameters_of_a_vit():
    model = _vit()
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    before = [m.weight.detach().clone() for m in norms]
    adapted = adapt(model, method="tent", options={"lr": 1e-2})
    learned = {id(p) for p in adapted.parameters() if p.requires_grad}
    new_norms = [m for m in adapted.modules() if isinstance(m, nn.LayerNorm)]
    assert learned == {id(p) for m in new_norms for p in (m.weight, m.bias)}
    with torch.inference_mode():
        adapted(torch.rand(4, 3, 160, 160))
    assert all(not torch.equal(m.weight, b) for m, b in zip(new_norms, before, strict=True))
    assert all(torch.equal(m.weight, b) for m, b in zip(norms, before, strict=True))  # the caller's model unchanged
    adapted.reset()
    assert all(torch.equal(m.weight, b) for m, b in zip(new_norms, before, strict=True))


def test_tent_on_groupnorm_and_bn_models_keeps_bn_only():
    gn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.LazyLinear(3))
    gn(torch.rand(1, 3, 6, 6))
    adapted = adapt(gn.eval(), method="tent")
    assert [n for n, p in adapted.named_parameters() if p.requires_grad] == ["net.1.weight", "net.1.bias"]
    mixed = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.GroupNorm(2, 4), nn.Flatten(), nn.LazyLinear(3))
    mixed(torch.rand(2, 3, 6, 6))
    adapted = adapt(mixed.eval(), method="tent")
    assert [n for n, p in adapted.named_parameters() if p.requires_grad] == ["net.1.weight", "net.1.bias"]
    with pytest.raises(ValueError, match="LayerNorm/GroupNorm layers with affine"):
        adapt(nn.Sequential(nn.Conv2d(3, 4, 3)), method="tent")


def test_bn_methods_refuse_a_model_without_bn_in_one_line():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LayerNorm(6))
    assert adapt(net, method="source") is not net
    with pytest.raises(ValueError, match="for method 'replace'.* use source or tent") as info:
        adapt(net, torch.rand(4, 3, 8, 8), method="replace")
    assert "\n" not in str(info.value)


@pytest.fixture
def zoo_bench(tmp_path):
    _save(tmp_path, "cifar10/Hendrycks2020AugMix_WRN", "state_dict_module")
    x = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "in.npz", x=x, y=np.arange(8))
    return tmp_path, [
        "bench", "--model", "robustbench:cifar10/Hendrycks2020AugMix_WRN", "timm:test_vit", "--model-dir",
        str(tmp_path / "models"), "--data", f"generate:cifar:{tmp_path / 'in.npz'}", "--corruptions",
        "gaussian_noise", "--severities", "1", "--n", "4", "-b", "8", "--no-progress", "--no-plots",
    ]  # fmt: skip


def test_bench_runs_a_vit_beside_a_bn_model_with_source_and_tent(zoo_bench):
    tmp_path, args = zoo_bench
    assert main([*args, "--methods", "source,tent", "--out", str(tmp_path / "o")]) == 0
    rows = read_results(tmp_path / "o")[1]
    got = {(r["model"], r["method"]) for r in rows}
    models = ("robustbench:cifar10/Hendrycks2020AugMix_WRN", "timm:test_vit")
    assert got == {(m, k) for m in models for k in ("source", "tent")}


def test_bench_refuses_bn_methods_on_a_vit_before_writing(zoo_bench, capsys):
    tmp_path, args = zoo_bench
    assert main([*args, "--methods", "source,replace,tent", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "timm:test_vit" in err and "replace" in err, err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_bench_missing_robustbench_file_one_line(tmp_path, capsys):
    x = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "in.npz", x=x, y=np.zeros(4, dtype=np.int64))
    args = ["bench", "--model", "robustbench:cifar10/Standard", "--model-dir", str(tmp_path / "nowhere"), "--data"]
    assert main([*args, f"npz:{tmp_path / 'in.npz'}", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "nowhere/cifar10/corruptions/Standard.pt" in err, err


@pytest.mark.slow
def test_bench_vit_tiny_beside_a_resnet_source_and_tent(tmp_path, capsys):
    x = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "in.npz", x=x, y=np.arange(8))
    args = ["bench", "--model", "timm:vit_tiny_patch16_224", "timm:resnet18", "--data", f"npz:{tmp_path / 'in.npz'}"]
    args += ["--methods", "source,tent", "--n", "4", "-b", "4", "--no-progress", "--no-plots"]
    assert main([*args, "--out", str(tmp_path / "o"), "--crop-pct", "0.9"]) == 0  # both read 224 crops alike
    assert len(read_results(tmp_path / "o")[1]) == 2 * 2
    data = ["--data", f"generate:cifar:{tmp_path / 'in.npz'}", "--corruptions", "fog"]  # 32x32 images as they are
    assert main([*args, *data, "--out", str(tmp_path / "g")]) == 2
    assert "expected images model timm:vit_tiny_patch16_224 can take" in capsys.readouterr().err
