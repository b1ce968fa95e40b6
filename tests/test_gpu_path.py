"""The GPU path: device selection and its errors (run everywhere), and on a CUDA device: nvJPEG decoding with the CPU
fallback, the corruption engine's torch path inside the benchmark, autocast and channels-last."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bnadapt.benchmark import BenchConfig, run_benchmark
from bnadapt.cli import main
from bnadapt.data import iter_batches_of, open_data
from conftest import make_tiny, write_imagenet_c


def _accs(rows):
    return {(r["method"], r["seed"], r["corruption"], r["severity"]): r["accuracy"] for r in rows}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU")
def test_device_cuda_without_a_gpu_is_a_one_line_error(tmp_path: Path, capsys, resnet20_checkpoint):
    # A checkpoint of our own: without ../shared the built-in weights are not found, which is another error.
    np.savez(tmp_path / "c.npz", x=np.zeros((8, 32, 32, 3), np.uint8), y=np.arange(8) % 10)
    code = main(["bench", "--model", "cifar10_resnet20", "--checkpoint", str(resnet20_checkpoint), "--data",
                 f"npz:{tmp_path / 'c.npz'}", "--device", "cuda", "--out", str(tmp_path / "out")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "CUDA is not available" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_bad_amp_and_decode_values_are_refused():
    with pytest.raises(ValueError, match="--amp"):
        BenchConfig(amp="fp8").validate()
    with pytest.raises(ValueError, match="decode"):
        BenchConfig(decode="gpu").validate()


def test_amp_bf16_on_cpu_stays_close_to_float32(tmp_path: Path, one_thread):
    write_imagenet_c(tmp_path, 224)
    data = open_data(f"imagenet-c:{tmp_path}", ["fog"], [1, 2])

    def correct(amp):
        rows = run_benchmark({"t": make_tiny()}, data, BenchConfig(ns=(4,), batch_size=3, amp=amp))
        return {(r["method"], r["severity"]): r["correct"] for r in rows}

    base, bf16 = correct(False), correct("bf16")
    # The random tiny net's logits nearly tie, so bf16 may flip a few of a cell's 6 predictions: at most 2 (counts,
    # not accuracies: 3/6 - 1/6 is a hair above 1/3 in floating point).
    assert base.keys() == bf16.keys() and all(abs(base[k] - bf16[k]) <= 2 for k in base)


@pytest.mark.cuda
def test_nvjpeg_decoding_matches_the_cpu_and_falls_back_per_file(tmp_path: Path):
    write_imagenet_c(tmp_path, 256)
    f = sorted((tmp_path / "fog" / "2").rglob("*.JPEG"))[2]
    Image.fromarray(np.full((256, 256, 3), 77, np.uint8)).save(f, format="PNG")  # nvJPEG refuses it
    data = open_data(f"imagenet-c:{tmp_path}", ["fog"], [1, 2])
    sets = [data.cell(*c) for c in data.cells]
    cpu = [x for _, x, _ in iter_batches_of(sets, 4)]
    gpu = [x for _, x, _ in iter_batches_of(sets, 4, jobs=2, pin_memory=True, device="cuda")]
    assert all(g.is_cuda for g in gpu)
    for a, b in zip(cpu, gpu, strict=True):
        assert a.shape == b.shape and (a.int() - b.cpu().int()).abs().max() <= 3
    assert sum(s.cpu_fallbacks() for s in sets) == 1


@pytest.mark.cuda
@pytest.mark.parametrize("amp", [False, "bf16", "fp16"])
def test_bench_on_cuda_matches_cpu(tmp_path: Path, amp):
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(0).integers(0, 256, (24, 32, 32, 3), np.uint8),
             y=np.arange(24) % 5)  # fmt: skip
    data = open_data(f"generate:cifar:{tmp_path / 'c.npz'}", ["gaussian_noise", "contrast"], [3])
    config = dict(methods=("source", "replace", "prior"), ns=(8,), seeds=(0, 1), batch_size=8)
    cpu = _accs(run_benchmark({"t": make_tiny()}, data, BenchConfig(**config)))
    gpu = _accs(run_benchmark({"t": make_tiny()}, data, BenchConfig(**config, device="cuda", jobs=2, amp=amp,
                                                                        channels_last=True)))  # fmt: skip
    assert cpu.keys() == gpu.keys() and all(abs(cpu[k] - gpu[k]) <= 2 / 24 for k in cpu)
