"""Everyday use of the command line (issue 17): progress lines in logs, list flags, one --device default, --out
parents, the run lock's host, and one line for a folder of outside symlinks."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bnadapt.cli import build_parser, main
from bnadapt.cli.args import Progress, device_of, made_parents
from bnadapt.data import read_images
from bnadapt.results import LOCK, Journal

HEADER = {"command": ["bench"], "fingerprint": {"data": "x"}}
LINE = re.compile(r"^\[(\d+)/(\d+)\] (.*)  elapsed \d+:\d\d, (~\d+:\d\d left|estimating what is left)$")


@pytest.fixture
def setup(tmp_path, resnet20_checkpoint):
    x = np.random.default_rng(0).integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "in.npz", x=x, y=np.arange(24) % 10)
    return tmp_path


def _bench(p: Path, out: Path, *extra: str) -> list[str]:
    return ["bench", "--model", "cifar10_resnet20", "--checkpoint", str(p / "ck.pt"), "--data",
            f"generate:cifar:{p / 'in.npz'}", "--out", str(out), "--corruptions", "contrast", "--severities", "5",
            "--n", "8", "--no-plots", "--device", "cpu", *extra]  # fmt: skip


def _lines(err: str) -> list[re.Match]:
    return [m for m in map(LINE.match, err.splitlines()) if m]


# -- progress when stderr is not a terminal --------------------------------------------------------------------------


def test_bench_not_on_a_terminal_prints_a_line_per_finished_cell(setup, capsys):
    assert main(_bench(setup, setup / "runs" / "r20")) == 0  # runs/ is created too
    assert (setup / "runs" / "r20" / "results.jsonl").is_file()
    lines = _lines(capsys.readouterr().err)
    # clean, then contrast:5, each with the accuracy of every method and the time left
    assert [(m[1], m[2]) for m in lines] == [("1", "2"), ("2", "2")]
    assert re.fullmatch(r"cifar10_resnet20 contrast:5  source \d+\.\d%  replace \d+\.\d%", lines[-1][3])
    assert lines[-1][4] == "~0:00 left"


def _corrupt(tmp_path: Path, *extra: str) -> list[str]:
    np.savez(tmp_path / "in.npz", x=np.zeros((4, 32, 32, 3), np.uint8), y=np.arange(4))
    return ["corrupt", "--input", str(tmp_path / "in.npz"), "--profile", "cifar", "--format", "cifar-c", "--out",
            str(tmp_path / "c"), "--corruptions", "contrast,brightness", "--severities", "1-5", *extra]  # fmt: skip


def test_corrupt_not_on_a_terminal_prints_a_line_per_tenth(tmp_path, capsys):
    assert main(_corrupt(tmp_path)) == 0
    lines = _lines(capsys.readouterr().err)
    assert 1 <= len(lines) <= 11 and lines[-1][1] == lines[-1][2] == "40" and lines[-1][3] == "images"


def test_no_progress_silences_the_lines(tmp_path, capsys):
    assert main(_corrupt(tmp_path, "--no-progress")) == 0
    assert _lines(capsys.readouterr().err) == []


def test_progress_lines_space_out_and_leave_resumed_work_out_of_the_estimate(capsys):
    p = Progress(True, "img", every=0.1)
    p.skip(50, 100)  # an earlier run's half: shown as done, never printed, not in the rate
    for _ in range(50):
        p.advance(1, 100, "images")
    p.close()
    lines = _lines(capsys.readouterr().err)
    assert [int(m[1]) for m in lines] == [60, 70, 80, 90, 100]


def test_progress_on_a_terminal_is_a_bar_not_lines(capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    p = Progress(True, "cell")
    p.update(1, 2, "r20 fog:3", {"source": 0.5})
    p.close()
    err = capsys.readouterr().err
    assert "1/2" in err and "r20 fog:3: source 50.0%" in err and not _lines(err)
    p = Progress(False, "cell")
    p.update(1, 2, "r20 fog:3", {"source": 0.5})
    assert capsys.readouterr().err == ""


# -- list flags: spaces, commas or both ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["bench", "--data", "x", "--model", "r20,r32", "r44", "--methods", "source,replace", "prior", "--n", "4,8",
          "16", "--seeds", "0-1", "4", "--corruptions", "fog,snow", "contrast", "--severities", "1,3", "5"],
         {"model": ("r20", "r32", "r44"), "methods": ("source", "replace", "prior"), "n": (4, 8, 16),
          "seeds": (0, 1, 4), "corruptions": ("fog", "snow", "contrast"), "severities": (1, 3, 5)}),
        (["sweep", "--data", "x", "--model", "r20", "--methods", "source", "replace", "--seeds", "0-2,5"],
         {"methods": ("source", "replace"), "seeds": (0, 1, 2, 5)}),
        (["analyze", "depth", "--data", "x", "--model", "r20", "--ks", "1,2", "4", "--corruptions", "fog",
          "--seeds", "0", "1"],
         {"ks": (1, 2, 4), "corruptions": ("fog",), "seeds": (0, 1)}),
        (["adapt", "--model", "r20", "--images", "x", "--layers", "net.bn1,net.layer1.*", "net.layer2.*"],
         {"layers": ("net.bn1", "net.layer1.*", "net.layer2.*")}),
        (["corrupt", "--input", "x", "--profile", "cifar", "--format", "cifar-c", "--corruptions", "fog,snow",
          "--severities", "1", "3"], {"corruptions": ("fog", "snow"), "severities": (1, 3)}),
        (["bank", "build", "--model", "r20", "--data", "x", "--corruptions", "noise,fog", "--severities", "1-2", "5"],
         {"corruptions": ("noise", "fog"), "severities": (1, 2, 5)}),
    ],
)  # fmt: skip
def test_every_list_flag_takes_spaces_and_commas(argv, expected):
    args = build_parser().parse_args([*argv, "--out", "o"])
    assert {k: getattr(args, k) for k in expected} == expected


# -- help that says what each seed is --------------------------------------------------------------------------------


def _help(argv: list[str], capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "400")  # one help text per line, whatever the terminal
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(
    ("argv", "phrases"),
    [
        (["corrupt"], ["--seed SEED seed of the corruption noise"]),
        (["bench"], ["draws of the n adaptation images from each cell", "--corrupt-seed CORRUPT_SEED seed of the "
                     "corruption noise that generate: data is made with"]),
        (["adapt"], ["--seed SEED seed of the draw of the n adaptation images from --images"]),
        (["bank", "build"], ["--seed SEED seed of the draw of the n images of each condition"]),
    ],
)  # fmt: skip
def test_each_seed_flag_says_what_it_seeds(argv, phrases, capsys, monkeypatch):
    text = _help(argv, capsys, monkeypatch)
    assert all(p in text for p in phrases), text


# -- one --device default --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["adapt"], ["bench"], ["sweep"], ["analyze"], ["bank", "build"]])
def test_every_device_flag_defaults_to_cuda_when_available(argv, capsys, monkeypatch):
    assert "--device DEVICE torch device, e.g. cpu, cuda, cuda:1 (default: cuda when available, else cpu)" in _help(
        argv, capsys, monkeypatch
    )


def test_device_default_follows_the_gpu(monkeypatch):
    import torch

    for available, expected in ((True, "cuda"), (False, "cpu")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda a=available: a)
        assert device_of(argparse.Namespace(device=None)) == expected
    assert device_of(argparse.Namespace(device="cuda:1")) == "cuda:1"


# -- --out creates its parents ---------------------------------------------------------------------------------------


def test_out_parents_are_created(setup, capsys):
    out = setup / "runs" / "deep" / "a.safetensors"
    argv = ["adapt", "--model", "cifar10_resnet20", "--checkpoint", str(setup / "ck.pt"), "--images",
            str(setup / "in.npz"), "--n", "8", "--device", "cpu"]  # fmt: skip
    assert main([*argv, "--out", str(out)]) == 0 and out.is_file()


def test_a_refused_command_leaves_no_parent_behind(setup, capsys):
    out = setup / "new" / "deeper" / "a.pt"
    argv = ["adapt", "--model", "cifar10_resnet20", "--checkpoint", str(setup / "ck.pt"), "--images",
            str(setup / "in.npz"), "--n", "99", "--out", str(out)]  # fmt: skip
    assert main(argv) == 2 and "n <=" in capsys.readouterr().err
    assert not (setup / "new").exists()


def test_out_parent_on_a_read_only_place_is_one_line(tmp_path, capsys, monkeypatch):
    def read_only(self, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    out = tmp_path / "ro" / "r20"
    assert main(["corrupt", "--input", "x.npz", "--profile", "cifar", "--format", "cifar-c", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"bnadapt: error: cannot write {tmp_path / 'ro'}: read-only file system; pass a writable --out"


def test_made_parents_keeps_what_existed(tmp_path):
    with pytest.raises(KeyError), made_parents(tmp_path / "a" / "b" / "out"):
        assert (tmp_path / "a" / "b").is_dir()
        raise KeyError
    assert list(tmp_path.iterdir()) == []


# -- the run lock: pid, host, start ----------------------------------------------------------------------------------


def test_lock_records_pid_host_and_start(tmp_path):
    j = Journal(tmp_path / "r", HEADER)
    info = json.loads((tmp_path / "r" / LOCK).read_text())
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname() and info["started"]
    j.close()


def test_a_lock_of_another_host_is_never_taken_over(tmp_path):
    (tmp_path / "r").mkdir()
    lock = tmp_path / "r" / LOCK
    lock.write_text(json.dumps({"pid": 1, "host": "node17", "started": "2026-01-01T10:00:00+0000"}))
    with pytest.raises(ValueError, match=r"on host node17: process 1, started 2026.*delete .*\.bnadapt\.lock"):
        Journal(tmp_path / "r", HEADER)
    assert json.loads(lock.read_text())["host"] == "node17"  # untouched


def test_a_dead_local_runs_lock_is_taken_over_in_either_format(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for content in (json.dumps({"pid": dead.pid, "host": socket.gethostname()}), f"{dead.pid}\n"):
        (tmp_path / "r").mkdir(exist_ok=True)
        (tmp_path / "r" / LOCK).write_text(content)
        with caplog.at_level(logging.WARNING):
            Journal(tmp_path / "r", HEADER, resume=True).close()
        assert f"left by process {dead.pid}" in caplog.text
        caplog.clear()


def test_a_live_local_run_in_the_old_format_is_refused(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / LOCK).write_text(f"{os.getppid()}\n")  # a live process that is not us
    with pytest.raises(ValueError, match=f"process {os.getppid()} holds"):
        Journal(tmp_path / "r", HEADER)


# -- a folder of symlinks that lead outside it -----------------------------------------------------------------------


def _png(path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(path)


def test_a_folder_of_outside_links_is_one_error_naming_follow_links(tmp_path, resnet20_checkpoint, caplog, capsys):
    for i in range(50):
        _png(tmp_path / "elsewhere" / f"{i}.png")
        (tmp_path / "in").mkdir(exist_ok=True)
        os.symlink(tmp_path / "elsewhere" / f"{i}.png", tmp_path / "in" / f"{i}.png")
    with caplog.at_level(logging.WARNING), pytest.raises(ValueError, match="50 symlink.*--follow-links"):
        read_images(tmp_path / "in")
    assert caplog.records == []
    # A checkpoint of its own: without ../shared the built-in weights are missing, which would be the error instead.
    argv = ["adapt", "--model", "cifar10_resnet20", "--checkpoint", str(resnet20_checkpoint), "--images",
            str(tmp_path / "in"), "--out", str(tmp_path / "a.pt")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--follow-links" in err[0]


def test_skipped_links_are_one_warning_line_each_kind(tmp_path, caplog):
    _png(tmp_path / "in" / "real.png")
    for i in range(5):
        _png(tmp_path / "elsewhere" / f"{i}.png")
        os.symlink(tmp_path / "elsewhere" / f"{i}.png", tmp_path / "in" / f"out{i}.png")
        os.symlink(tmp_path / "gone.png", tmp_path / "in" / f"broken{i}.png")
    with caplog.at_level(logging.WARNING):
        x, _ = read_images(tmp_path / "in")
    assert len(x) == 1
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "5 link(s) to no readable file" in messages[0]
    assert "5 symlink(s)" in messages[1] and "--follow-links" in messages[1]
