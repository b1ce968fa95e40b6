"""The ImageNet-C pipeline: the prepared cache of generate:'s clean folder, the prefetching stage, and the order in
which cells are loaded and scheduled over ranks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bnadapt.data import CachedImages, FileImages, iter_batches_of, open_clean, open_data, prepared_images
from bnadapt.distributed import Dist
from bnadapt.schedule import DATA_COST, item_cost, longest_first, simulate
from conftest import write_jpeg

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A class folder of 6 JPEGs of different sizes (each is resized to 256 and cropped to 224)."""
    sizes = [(300, 260), (250, 400), (227, 227), (500, 375), (256, 300), (240, 240)]
    for i, (w, h) in enumerate(sizes):
        write_jpeg(tmp_path / "images" / str(i % 2) / f"im{i}.JPEG", w, h, i)
    return tmp_path / "images"


def _cells(data, cells) -> list[np.ndarray]:
    return [data.cell(*c).get(np.arange(len(data.cell(*c)))) for c in cells]


@pytest.mark.parametrize("limit", [None, 4])
def test_prepared_cache_gives_the_bytes_of_decoding_every_file(folder: Path, tmp_path: Path, limit):
    cells = [("clean", 0), ("contrast", 3), ("gaussian_noise", 2)]
    plain = open_data(f"generate:imagenet:{folder}", ["contrast", "gaussian_noise"], [2, 3], limit=limit)
    cached = open_data(
        f"generate:imagenet:{folder}", ["contrast", "gaussian_noise"], [2, 3], limit=limit, cache=tmp_path / "c"
    )
    for a, b in zip(_cells(plain, cells), _cells(cached, cells), strict=True):
        np.testing.assert_array_equal(a, b)
    held = list((tmp_path / "c" / "prepared").glob("prepared-*.npy"))
    assert len(held) == 1 and np.load(held[0]).shape == (limit or 6, 224, 224, 3)
    s = cached.cell("contrast", 3)
    while not isinstance(s, CachedImages):  # under the subset (limit) and the corruption: the map, not the files
        s = s.base
    assert s.path == held[0]


def test_a_second_open_reads_the_cache_without_decoding(folder: Path, tmp_path: Path, monkeypatch):
    base = open_clean(folder, "resize256-crop224")
    first = prepared_images(base, tmp_path)

    def refuse(*_):
        raise AssertionError("decoded again")

    monkeypatch.setattr(FileImages, "get", refuse)
    again = prepared_images(open_clean(folder, "resize256-crop224"), tmp_path)
    assert again.path == first.path
    np.testing.assert_array_equal(again.get(np.arange(6)), first.get(np.arange(6)))


def test_a_changed_or_added_file_makes_a_new_cache(folder: Path, tmp_path: Path):
    first = prepared_images(open_clean(folder, "resize256-crop224"), tmp_path)
    f = sorted(folder.rglob("*.JPEG"))[2]
    st = f.stat()
    write_jpeg(f, 260, 300, 99)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = open_clean(folder, "resize256-crop224")
    second = prepared_images(changed, tmp_path)
    assert second.path != first.path
    np.testing.assert_array_equal(second.get(np.arange(6)), changed.get(np.arange(6)))
    write_jpeg(folder / "1" / "new.JPEG", 300, 300, 7)
    third = prepared_images(open_clean(folder, "resize256-crop224"), tmp_path)
    assert len(third) == 7 and third.path not in (first.path, second.path)


def test_a_failed_build_leaves_no_half_cache(folder: Path, tmp_path: Path):
    f = sorted(folder.rglob("*.JPEG"))[-1]
    f.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="unreadable"):
        prepared_images(open_clean(folder, "resize256-crop224"), tmp_path)
    assert [p.name for p in (tmp_path / "prepared").iterdir() if not p.name.endswith(".lock")] == []


def test_concurrent_builds_decode_once(folder: Path, tmp_path: Path, monkeypatch):
    decoded = []
    get = FileImages.get

    def counting(self, indices):
        decoded.append(len(indices))
        time.sleep(0.05)  # long enough for the other thread to arrive while this one builds
        return get(self, indices)

    monkeypatch.setattr(FileImages, "get", counting)
    out: list[CachedImages] = []
    threads = [
        threading.Thread(target=lambda: out.append(prepared_images(open_clean(folder, "resize256-crop224"), tmp_path)))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 2 and out[0].path == out[1].path
    assert sum(decoded) == 6  # the second waited for the first's file instead of decoding again


_SLOW_BUILD = r"""
import sys, time
from bnadapt.data import FileImages, open_clean, prepared_images
get = FileImages.get
def slow(self, indices):
    time.sleep(30)
    return get(self, indices)
FileImages.get = slow
prepared_images(open_clean(sys.argv[1], "resize256-crop224"), sys.argv[2])
"""


@pytest.mark.slow
def test_a_killed_build_leaves_no_cache_and_the_next_build_cleans_up(folder: Path, tmp_path: Path):
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_BUILD, str(folder), str(tmp_path)], env=env)
    try:
        for _ in range(600):  # the temporary file appears once the build has started
            if list((tmp_path / "prepared").glob(".prepared-*.tmp")) if (tmp_path / "prepared").is_dir() else []:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the build never started")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not list((tmp_path / "prepared").glob("prepared-*.npy"))
    s = prepared_images(open_clean(folder, "resize256-crop224"), tmp_path)
    assert s.get(np.arange(6)).shape == (6, 224, 224, 3)
    assert not list((tmp_path / "prepared").glob(".prepared-*.tmp"))


def test_cached_images_travel_to_workers_by_path(folder: Path, tmp_path: Path):
    import pickle

    s = prepared_images(open_clean(folder, "resize256-crop224"), tmp_path, positions=np.array([1, 4]))
    blob = pickle.dumps(s)
    assert len(blob) < 10_000  # not the images
    again = pickle.loads(blob)
    np.testing.assert_array_equal(again.get(np.array([4])), s.get(np.array([4])))
    with pytest.raises(ValueError, match="positions held"):
        s.get(np.array([2]))


@pytest.mark.parametrize("jobs", [0, 2])
def test_prefetch_gives_the_batches_of_the_plain_loop(folder: Path, tmp_path: Path, jobs: int):
    """The GPU path's stage (finish in a side thread, one batch ahead) run on the CPU: the same batches, in order."""
    data = open_data(f"generate:imagenet:{folder}", ["gaussian_noise", "contrast"], [2], cache=tmp_path)
    sets = [data.cell(*c) for c in data.cells]
    plain = list(iter_batches_of(sets, 4, jobs, on_device=True, prefetch=False))
    ahead = list(iter_batches_of(sets, 4, jobs, on_device=True, prefetch=True))
    assert [k for k, _, _ in plain] == [k for k, _, _ in ahead] == [0, 0, 1, 1, 2, 2]
    for (_, a, ya), (_, b, yb) in zip(plain, ahead, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert torch.equal(ya, yb)


def test_prefetch_passes_a_finish_error_on(folder: Path):
    f = sorted(folder.rglob("*.JPEG"))[3]
    f.write_bytes(b"broken")
    s = open_clean(folder, "crop224")
    with pytest.raises(ValueError, match="unreadable.*im"):
        list(iter_batches_of([s], 2, prefetch=True))


@pytest.mark.cuda
def test_prefetch_on_a_side_stream_gives_the_batches_of_the_plain_loop(folder: Path, tmp_path: Path):
    data = open_data(f"generate:imagenet:{folder}", ["gaussian_noise", "fog"], [3], cache=tmp_path)
    sets = [data.cell(*c) for c in data.cells]
    plain = [x.cpu() for _, x, _ in iter_batches_of(sets, 4, 0, True, "cuda", prefetch=False)]
    ahead = [x.cpu() for _, x, _ in iter_batches_of(sets, 4, 0, True, "cuda", prefetch=True)]
    for a, b in zip(plain, ahead, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_cells_load_in_the_order_given_and_only_when_needed():
    from bnadapt.data import ArrayImages

    sets = [ArrayImages(np.full((3, 4, 4, 3), k, np.uint8), np.arange(3)) for k in range(3)]
    asked = []

    def order():
        for k in (2, 0):
            asked.append(k)
            yield k

    batches = iter_batches_of(sets, 2, order=order())
    k, x, _ = next(batches)
    assert (k, int(x[0, 0, 0, 0]), asked) == (2, 2, [2])  # cell 0 not chosen yet
    assert [k for k, _, _ in batches] == [2, 0, 0] and asked == [2, 0]


def test_longest_first_beats_round_robin_rounds():
    rng = np.random.default_rng(0)
    times = list(rng.uniform(1, 3, 76))  # 76 cells of uneven cost
    total = sum(times)
    rr = total / (8 * simulate(times, 8, "round-robin"))
    lf = total / (8 * simulate(times, 8, "longest-first"))
    assert lf >= 0.95 > rr
    assert longest_first([2.0, 5.0, 1.0]) == [1, 0, 2]
    with pytest.raises(ValueError, match="policy"):
        simulate(times, 8, "random")


def test_item_cost_weighs_images_variants_and_the_corruption():
    assert item_cost([("fog", 1)], [10], 3, generated=False) == 10 * (3 + 1)
    assert item_cost([("glass_blur", 5)], [10], 3, True) == pytest.approx(10 * (3 + DATA_COST["glass_blur"]))
    assert DATA_COST["glass_blur"] > DATA_COST["contrast"] > DATA_COST["jpeg_compression"]
    assert abs(np.mean(list(DATA_COST.values())) - 1) < 0.01


def test_one_process_takes_every_item_in_plan_order():
    take = Dist().queue([1.0, 5.0, 3.0])
    assert [take() for _ in range(4)] == [0, 1, 2, None]


def test_schedule_sim_reads_a_results_folder(tmp_path: Path, capsys, one_thread):
    import runpy

    from bnadapt.benchmark import BenchConfig, run_benchmark
    from conftest import make_tiny

    np.savez(tmp_path / "c.npz", x=np.zeros((8, 32, 32, 3), np.uint8), y=np.arange(8) % 5)
    data = open_data(f"generate:cifar:{tmp_path / 'c.npz'}", ["contrast", "fog"], [1, 5])
    run_benchmark({"tiny": make_tiny()}, data, BenchConfig(ns=(4,), batch_size=8), out=tmp_path / "run")
    script = Path(__file__).parents[1] / "benchmarks" / "schedule_sim.py"
    module = runpy.run_path(str(script))
    assert module["main"](["--results", str(tmp_path / "run"), "--ranks", "2"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "5 cells, 2 ranks" in line
    rr, estimated, true = (float(v) for v in line.split()[-3:])
    assert 0 < rr <= 1 and 0 < estimated <= 1 and 0 < true <= 1
