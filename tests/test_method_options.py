"""Method options: declared per method, typed by their defaults, checked before anything runs."""

import pytest
import torch
from torch import nn

from bnadapt.adapt import adapt, method_options, parse_options, register_method, unregister_method


@pytest.fixture
def toy_method():
    seen = {}

    @register_method("toy", images="unused", options={"lr": 0.1, "steps": 1, "episodic": False, "kind": "adam"})
    def toy(model, images, cfg, layers):
        seen.update(cfg.options)
        return model

    yield seen
    unregister_method("toy")


def test_options_take_the_defaults_types(toy_method):
    got = parse_options(["toy"], ["lr=0.5", "steps=3", "episodic=yes", "kind=sgd"])
    assert got == {"lr": 0.5, "steps": 3, "episodic": True, "kind": "sgd"}
    assert type(got["lr"]) is float and type(got["steps"]) is int


@pytest.mark.parametrize(
    "item, message",
    [("lr", "key=value"), ("momentum=1", "accepted: episodic, kind, lr, steps"), ("steps=1.5", "int"),
     ("episodic=maybe", "bool"), ("lr=fast", "float")],
)  # fmt: skip
def test_bad_options_are_refused_with_what_was_expected(toy_method, item, message):
    with pytest.raises(ValueError, match=message):
        parse_options(["toy"], [item])


def test_adapt_passes_defaults_and_overrides(toy_method):
    net = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2))
    adapt(net, method="toy", options={"steps": 5})
    assert toy_method == {"lr": 0.1, "steps": 5, "episodic": False, "kind": "adam"}
    with pytest.raises(ValueError, match="accepted: none"):
        adapt(net, torch.rand(4, 3, 4, 4), method="replace", options={"lr": 1.0})
    assert method_options("toy")["lr"] == 0.1
