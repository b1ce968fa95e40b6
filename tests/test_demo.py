"""The demo: runs offline, trains once (cached), and shows adaptation recovering accuracy."""

from __future__ import annotations

from bnadapt.cli import main
from bnadapt.demo import digits_data


def test_digits_data_shapes():
    xtr, ytr, xte, yte = digits_data()
    assert xtr.shape[1:] == (32, 32, 1) and xtr.dtype.name == "uint8"
    assert len(xtr) + len(xte) == 1797 and set(ytr.tolist()) == set(range(10))


def test_demo_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BNADAPT_CACHE", str(tmp_path))
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    mean = next(line for line in out.splitlines() if line.startswith("mean")).split()
    source, replace, prior = map(float, mean[1:])
    assert replace > source + 20 and prior > source
    assert list(tmp_path.glob("digits_cnn_*.pt"))  # cached for the next run
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "| replace n=32 |" in report and (tmp_path / "demo" / "results.jsonl").is_file()


def test_training_is_seeded_and_leaves_global_rng_alone(tmp_path, monkeypatch):
    import torch

    from bnadapt.demo import trained_digits_cnn

    xtr, ytr, _, _ = digits_data()
    nets = []
    for sub in ("a", "b"):
        monkeypatch.setenv("BNADAPT_CACHE", str(tmp_path / sub))
        torch.manual_seed(123)
        expected = torch.rand(1)
        torch.manual_seed(123)
        nets.append(trained_digits_cnn(xtr[:256], ytr[:256], epochs=1))
        assert torch.equal(torch.rand(1), expected)  # training drew from its own forked generator
    a, b = (n.net.state_dict() for n in nets)
    assert all(torch.equal(a[k], b[k]) for k in a)
