"""``bnadapt bench`` over 2 gloo processes (torchrun): the same rows as one process, failures, refused options."""

from __future__ import annotations

import ast
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bnadapt.bn import estimate_stats
from bnadapt.cli import main
from bnadapt.results import RESULTS, read_results
from conftest import make_tiny, save_resnet20_checkpoint

SRC = str(Path(__file__).resolve().parents[1] / "src")
GRID = ["--model", "cifar10_resnet20", "--corruptions", "gaussian_noise", "contrast", "--severities", "1,5",
        "--methods", "source,replace,prior", "--n", "8", "--seeds", "0,1", "--no-progress", "--no-plots"]  # fmt: skip


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> tuple[Path, list[tuple]]:
    """A folder with the checkpoint and 48 images, and the rows of the grid run by one process."""
    p = tmp_path_factory.mktemp("dist")
    save_resnet20_checkpoint(p)
    x = np.random.default_rng(0).integers(0, 256, (48, 32, 32, 3), dtype=np.uint8)
    np.savez(p / "in.npz", x=x, y=np.arange(48) % 10)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(_bench(p, "one")) == 0
    finally:
        torch.set_num_threads(before)
    one = _rows(p / "one")
    assert len(one) == 25 and len({r[-1] for r in one}) > 1  # 5 cells x 5 variants, not all the same accuracy
    return p, one


def _bench(p: Path, out: str, *extra: str) -> list[str]:
    return ["bench", *GRID, "--checkpoint", str(p / "ck.pt"), "--data", f"generate:cifar:{p / 'in.npz'}", "--out",
            str(p / out), *extra]  # fmt: skip


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "BNADAPT_TEST_FAIL_RANK")
    return {
        **{k: v for k, v in os.environ.items() if k not in drop},
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": SRC,
        **extra,
    }


def _torchrun(p: Path, argv: list[str]) -> subprocess.CompletedProcess:
    # "--" keeps torchrun's own parser off bench's options (--n would be an ambiguous prefix of --nnodes).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_port()),
           "-m", "bnadapt", "--", *argv]  # fmt: skip
    return subprocess.run(cmd, cwd=p, env=_env(), capture_output=True, text=True, timeout=180)


def _two_ranks(p: Path, argv0: list[str], argv1: list[str], **env: str) -> list[tuple[int, str, str]]:
    """Start rank 0 and rank 1 as torchrun would (its environment variables), without torchrun's agent process."""
    port, procs = str(_port()), []
    for rank, argv in enumerate((argv0, argv1)):
        e = _env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=port, **env)  # fmt: skip
        cmd = [sys.executable, env["BNADAPT_SCRIPT"]] if "BNADAPT_SCRIPT" in env else [sys.executable, "-m", "bnadapt"]
        procs.append(subprocess.Popen([*cmd, *argv], cwd=p, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))  # fmt: skip
    try:
        outputs = [proc.communicate(timeout=180) for proc in procs]
    finally:
        for proc in procs:  # a rank that never joins leaves the other waiting for it
            proc.kill()
    return [(proc.returncode, *out) for proc, out in zip(procs, outputs, strict=True)]


def _rows(path: Path) -> list[tuple]:
    keys = (
        "model",
        "method",
        "n",
        "seed",
        "corruption",
        "severity",
        "correct",
        "correct5",
        "total",
        "accuracy",
        "top5",
    )
    return sorted(tuple(str(r[k]) for k in keys) for r in read_results(path)[1])


def test_torchrun_two_ranks_give_the_rows_of_one_process(grid):
    p, one = grid
    run = _torchrun(p, _bench(p, "cells"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert _rows(p / "cells") == one
    assert read_results(p / "cells")[0][0]["distributed"] == {"world_size": 2, "shard_cells": False, "backend": "gloo"}
    assert run.stdout.count("results in") == 1  # only rank 0 prints the summary


def test_shard_cells_give_the_rows_of_one_process(grid):
    p, one = grid
    argv = _bench(p, "shard", "--shard-cells")
    (rc0, out0, err0), (rc1, out1, _) = _two_ranks(p, argv, argv)
    assert rc0 == rc1 == 0, err0[-2000:]
    assert _rows(p / "shard") == one
    assert read_results(p / "shard")[0][0]["distributed"]["shard_cells"] is True
    assert "results in" in out0 and not out1


def test_a_failed_rank_keeps_finished_cells_and_resume_completes(grid, one_thread):
    p, one = grid
    argv = _bench(p, "o")
    (rc0, _, err0), (rc1, _, err1) = _two_ranks(p, argv, argv, BNADAPT_TEST_FAIL_RANK="1")
    assert rc0 == rc1 == 1
    assert "RuntimeError: simulated failure of rank 1" in err1  # the failed rank's traceback
    assert err0.strip() == (
        "bnadapt: error: rank 1 failed (RuntimeError: simulated failure of rank 1 (BNADAPT_TEST_FAIL_RANK)); "
        f"finished cells are in {p / 'o' / RESULTS}, rerun with --resume"
    )
    kept = _rows(p / "o")
    # Rank 1 fails after its first cell, which is kept with those rank 0 finished before it saw the failure.
    assert len(kept) % 5 == 0 and 2 * 5 <= len(kept) < 5 * 5 and set(kept) < set(one)
    assert not (p / "o" / ".bnadapt.lock").exists()
    assert main([*argv, "--resume"]) == 0  # one process resumes what two started
    assert _rows(p / "o") == one


def test_different_options_on_two_ranks_are_refused_before_writing(grid):
    p, _ = grid
    argv = _bench(p, "diff")
    other = [*argv, "--seeds", "0"]  # the last --seeds wins
    for rc, _, err in _two_ranks(p, argv, other):
        assert rc == 2, err
        assert "expected the same bench options on every rank, got config.seeds=(0,) on rank 1 but (0, 1)" in err
        assert len(err.strip().splitlines()) == 1
    assert not (p / "diff").exists()


def test_shard_cells_refuses_online_methods(grid, capsys):
    p, _ = grid
    argv = _bench(p, "online", "--shard-cells", "--methods", "source,tent")
    assert main(argv) == 2
    assert "expected offline methods with --shard-cells, got online tent" in capsys.readouterr().err
    assert not (p / "online").exists()


_QUEUE = r"""
import sys, time
import torch.distributed as tdist
from bnadapt.distributed import init_from_env
dist, _ = init_from_env("cpu", timeout=60)
take = dist.queue([1.0, 5.0, 3.0, 2.0, 4.0, 0.5])
got = []
while (i := take()) is not None:
    got.append(i)
    time.sleep(1.0 if dist.rank == 0 else 0.05)  # rank 0 is slow: rank 1 takes more
tdist.barrier()
other = dist.queue([1.0, 2.0])  # the second queue of the run starts afresh
if dist.rank == 1:
    tdist.distributed_c10d._get_default_store().set("bnadapt/failed", "1")
tdist.barrier()
print(got, other())
dist.close()
"""


def test_ranks_share_one_queue_longest_first(tmp_path: Path):
    script = tmp_path / "take_items.py"
    script.write_text(_QUEUE)
    (rc0, out0, err0), (rc1, out1, _) = _two_ranks(tmp_path, [], [], BNADAPT_SCRIPT=str(script))
    assert rc0 == rc1 == 0, err0[-2000:]
    got0, got1 = (ast.literal_eval(out.strip().rpartition(" ")[0]) for out in (out0, out1))
    assert sorted(got0 + got1) == list(range(6))  # every item once, on one rank
    assert {got0[0], got1[0]} == {1, 4}  # the two longest first
    assert len(got1) > len(got0)  # the faster rank took more
    assert out0.strip().endswith("None") and out1.strip().endswith("None")  # a failure empties every queue


class _Alone:
    """The reducer of one process: the combined batch is the batch itself."""

    def moments(self, x):
        dims = [0, *range(2, x.ndim)]
        var, mean = torch.var_mean(x.double(), dim=dims, correction=0)
        n = x.numel() // x.shape[1]
        return n, mean, var * n

    def images(self, count):
        return count


def test_combined_batches_normalise_like_a_train_mode_forward(one_thread):
    # Eval-mode layers fed the combined batch statistics must reproduce a train-mode forward (BN2d and BN1d).
    net, x = make_tiny(), torch.rand(16, 3, 12, 12)
    combined = estimate_stats(net, x, batch_size=16, reducer=_Alone())
    plain = estimate_stats(net, x, batch_size=16)
    assert combined.metadata == plain.metadata and combined.count == plain.count
    for n in plain.names:
        torch.testing.assert_close(combined.mean[n], plain.mean[n], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(combined.var[n], plain.var[n], rtol=1e-5, atol=1e-6)
    assert not torch.equal(plain.var["bn3"], net.bn3.running_var)  # the model itself is unchanged
