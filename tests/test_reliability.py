"""Reliability: interrupted and concurrent runs, a full disk, determinism across workers, numerics of estimation.

Random SIGKILLs at many points are the job of ``benchmarks/reliability_campaign.py`` (too slow for CI); these tests
cover one case of each kind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bnadapt import adapt
from bnadapt.bn import bn_layers, estimate_stats
from bnadapt.cli import main
from bnadapt.corruptions.export import export_corrupted
from bnadapt.models import cifar_resnet
from bnadapt.results import LOCK, read_results


@pytest.fixture
def setup(tmp_path, resnet20_checkpoint):
    x = np.random.default_rng(1).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "in.npz", x=x, y=np.arange(40) % 10)
    return tmp_path


def _bench(p, out, *extra):
    return ["bench", "--model", "cifar10_resnet20", "--checkpoint", str(p / "ck.pt"), "--data",
            f"generate:cifar:{p / 'in.npz'}", "--out", str(p / out), "--corruptions", "noise", "digital",
            "--n", "8", "--no-progress", "--no-plots", *extra]  # fmt: skip


def _rows(path):
    return sorted(
        (r["method"], r["n"], r["seed"], r["corruption"], r["severity"], r["correct"], r["total"])
        for r in read_results(path)[1]
    )


def test_disk_full_keeps_finished_cells_and_resume_completes(setup, capsys, monkeypatch):
    assert main(_bench(setup, "full", "--severities", "1,2")) == 0
    real_fsync, calls = os.fsync, []

    def fsync_then_full(fd):
        calls.append(fd)
        if len(calls) == 3:  # the header, one cell, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr("bnadapt.results.os.fsync", fsync_then_full)
    assert main(_bench(setup, "cut", "--severities", "1,2")) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left" in err and "--resume" in err
    rows = _rows(setup / "cut")
    assert len(rows) == 2 and set(rows) < set(_rows(setup / "full"))  # the clean cell, whole; nothing half-written
    assert not (setup / "cut" / LOCK).exists()
    monkeypatch.setattr("bnadapt.results.os.fsync", real_fsync)
    assert main(_bench(setup, "cut", "--severities", "1,2", "--resume")) == 0
    assert _rows(setup / "cut") == _rows(setup / "full")


def test_disk_full_in_corrupt_is_one_line(tmp_path, capsys, monkeypatch):
    np.savez(tmp_path / "in.npz", x=np.zeros((4, 32, 32, 3), np.uint8), y=np.arange(4))

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "somewhere.npy")

    monkeypatch.setattr("bnadapt.corruptions.export.np.save", full)
    code = main(["corrupt", "--input", str(tmp_path / "in.npz"), "--out", str(tmp_path / "c"), "--corruptions",
                 "contrast", "--profile", "cifar", "--format", "cifar-c", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "no space left" in err
    assert not list((tmp_path / "c").glob("*.npy"))


def _wait_for(path, proc, timeout=600):  # generous: a busy 2-core machine starts torch slowly
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if path.exists():
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it paused: {proc.stderr.read()}")
        time.sleep(0.05)
    pytest.fail("the run never paused")


# The interrupted run pauses for good after its second cell, inside the journal's append (the row is on disk by then),
# so the signal always lands mid-run: without the pause a fast machine could finish the run before the signal.
# A shell's background job inherits SIGINT ignored (make test & , a CI runner): Ctrl-C is restored as a terminal has it.
_PAUSING_RUN = """
import signal, sys, time
from pathlib import Path
signal.signal(signal.SIGINT, signal.default_int_handler)
from bnadapt import results
from bnadapt.cli import main
real, appends = results.Journal.append, []
def append_then_pause(self, rows):
    real(self, rows)
    appends.append(rows)
    if len(appends) == 2:
        Path(sys.argv[1]).touch()
        while True:
            time.sleep(0.05)
results.Journal.append = append_then_pause
sys.exit(main(sys.argv[2:]))
"""


def test_sigint_stops_cleanly_second_writer_refused_resume_equals_uninterrupted(setup):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args, paused = _bench(setup, "int", "--severities", "1,2"), setup / "paused"
    cmd = [sys.executable, "-c", _PAUSING_RUN, str(paused), *args]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    try:
        _wait_for(paused, proc)
        # A second run on the same --out while the first is writing: refused, nothing written by it.
        assert main(args + ["--resume"]) == 2
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "--resume" in err and "Traceback" not in err
    assert not (setup / "int" / LOCK).exists()
    partial = _rows(setup / "int")
    assert main(args + ["--resume"]) == 0
    assert main(_bench(setup, "ref", "--severities", "1,2")) == 0
    assert set(partial) < set(_rows(setup / "int")) and _rows(setup / "int") == _rows(setup / "ref")


def test_bench_same_rows_with_any_workers(setup):
    for j in ("0", "1", "2"):
        assert main(_bench(setup, f"j{j}", "--severities", "3", "-j", j, "-b", "16" if j == "2" else "64")) == 0
    assert _rows(setup / "j0") == _rows(setup / "j1") == _rows(setup / "j2")


def test_corrupt_same_bytes_with_any_workers(tmp_path):
    x = np.random.default_rng(2).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "in.npz", x=x, y=np.arange(6))
    for j in (1, 2):
        export_corrupted(tmp_path / "in.npz", tmp_path / f"j{j}", corruptions=["shot_noise", "elastic_transform"],
                         severities=[2, 5], jobs=j)  # fmt: skip
    for f in sorted((tmp_path / "j1").glob("*.npy")):
        assert (tmp_path / "j2" / f.name).read_bytes() == f.read_bytes()


def test_zero_variance_sample_gives_finite_outputs():
    """Constant target images give a BN layer a sample variance of 0: eps keeps the division finite, as in BN."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 8 * 8, 3)).eval()  # fmt: skip
    flat = torch.full((8, 3, 8, 8), 0.5)
    assert float(estimate_stats(net, flat).var["1"].abs().max()) == 0.0
    adapted = adapt(net, flat, method="replace")
    assert torch.isfinite(adapted(torch.rand(4, 3, 8, 8))).all() and torch.isfinite(adapted(flat)).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_never_lowers_stored_statistics_precision(dtype):
    net = cifar_resnet(20).eval()
    x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    plain = estimate_stats(net, x)
    with torch.autocast("cpu", dtype=dtype):
        mixed = estimate_stats(net, x)
        adapted = adapt(net, x, method="replace")
    for name, m in bn_layers(adapted):
        assert mixed.mean[name].dtype == m.running_mean.dtype == m.running_var.dtype == torch.float32
        # Low-precision convolutions move the statistics a little, never to another scale.
        torch.testing.assert_close(mixed.mean[name], plain.mean[name], rtol=0.05, atol=0.05)


def test_links_outside_the_input_followed_only_when_asked_and_outputs_stay_inside(tmp_path, caplog):
    from PIL import Image

    (tmp_path / "in" / "a").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    Image.new("RGB", (32, 32), (10, 20, 30)).save(tmp_path / "in" / "a" / "x.png")
    Image.new("RGB", (32, 32), (200, 20, 30)).save(tmp_path / "elsewhere" / "secret.png")
    os.symlink(tmp_path / "elsewhere", tmp_path / "in" / "b")  # a class folder that is a link to outside the input
    argv = ["corrupt", "--input", str(tmp_path / "in"), "--profile", "cifar", "--format", "imagenet-c", "--no-resize",
            "--corruptions", "contrast", "--severities", "1", "--no-progress"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "o1")]) == 0
    written = sorted(p.relative_to(tmp_path / "o1").as_posix() for p in (tmp_path / "o1").rglob("*.JPEG"))
    assert written == ["contrast/1/a/x.JPEG"] and "1 symlink(s)" in caplog.text and "--follow-links" in caplog.text
    assert main([*argv, "--out", str(tmp_path / "o2"), "--follow-links"]) == 0
    written = sorted(p.relative_to(tmp_path / "o2").as_posix() for p in (tmp_path / "o2").rglob("*.JPEG"))
    # Named after the link inside the input, never after where it points: nothing is written outside --out.
    assert written == ["contrast/1/a/x.JPEG", "contrast/1/b/secret.JPEG"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "in", "o1", "o2"]


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc to find worker processes")
def test_corrupt_workers_exit_when_the_main_process_is_killed(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (3000, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "in.npz", x=x, y=np.arange(3000) % 10)
    proc = subprocess.Popen([sys.executable, "-m", "bnadapt", "corrupt", "--input", str(tmp_path / "in.npz"),
                             "--profile", "cifar", "--format", "cifar-c", "--out", str(tmp_path / "o"), "-j", "2",
                             "--corruptions", "blur", "--no-progress"], stderr=subprocess.DEVNULL)  # fmt: skip
    workers: list[int] = []
    try:
        t0 = time.monotonic()
        while len(workers := _children(proc.pid)) < 2 and time.monotonic() - t0 < 60 and proc.poll() is None:
            time.sleep(0.05)
        assert len(workers) >= 2, "the worker processes never started"
        proc.kill()
        proc.wait()
        t0 = time.monotonic()
        while any(_alive(w) for w in workers) and time.monotonic() - t0 < 10:
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers), "workers outlived the killed main process"
    finally:  # never leave processes behind, whatever failed
        proc.kill()
        for w in workers:
            with contextlib.suppress(OSError):
                os.kill(w, signal.SIGKILL)
