"""The slow half of the reliability campaign: random kills, a really full disk, and memory on a large folder.

Usage: python benchmarks/reliability_campaign.py [--kills 8] [--sizes 5000,50000] [--seed 0] [--only kill,disk,rss]

- kill: ``bnadapt bench`` and ``bnadapt corrupt`` (both layouts) are stopped at random moments with SIGKILL or SIGINT
  until a run completes with ``--resume`` / a rerun; the final outputs must equal an uninterrupted run's: rows (keys,
  correct counts) for bench, bytes for corrupt.
- disk: ``bnadapt bench`` writing into a tiny tmpfs (needs root; skipped otherwise) must stop with a one-line error,
  keep every finished row intact, and finish with ``--resume`` once space is back.
- rss: peak resident memory of ``bnadapt corrupt`` and ``bnadapt bench`` on class folders of each size of 32x32 PNGs;
  it must not grow with the dataset size.

Prints one markdown table per part; exits 1 if any check failed. Every run uses a temporary directory.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bnadapt.results import read_results

BNADAPT = [sys.executable, "-m", "bnadapt"]


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*BNADAPT, *args], capture_output=True, text=True, **kw)


def _rows(out: Path) -> list[tuple]:
    keys = ("model", "method", "n", "seed", "corruption", "severity", "correct", "total")
    return sorted(tuple(r[k] for k in keys) for r in read_results(out)[1])


def _checkpoint(tmp: Path) -> Path:
    """A seeded random-init ResNet-20 state dict (no weights needed: the checks compare runs, not accuracy)."""
    import torch

    from bnadapt.models import cifar_resnet

    torch.manual_seed(0)
    torch.save(cifar_resnet(20).net.state_dict(), tmp / "ck.pt")
    return tmp / "ck.pt"


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _written_since(out: Path, t: float) -> bool:
    """Whether anything under ``out`` was modified at or after ``t`` (files come and go while a run writes)."""
    for dirpath, dirnames, filenames in os.walk(out):
        for name in dirnames + filenames:
            try:
                if os.stat(os.path.join(dirpath, name)).st_mtime >= t:
                    return True
            except FileNotFoundError:
                continue
    return False


def _interrupted(args: list[str], resume: list[str], kills: int, rng: random.Random, span: float, out: Path) -> dict:
    """Start ``args``, stop it at random moments (``kills`` times at most), rerun with ``resume`` until it exits 0.

    SIGINT is sent only once this run has written under ``out``: a Ctrl-C while Python is still importing torch,
    before bnadapt's code runs, ends in Python's own KeyboardInterrupt traceback (nothing is written by then);
    SIGKILL can come any time.
    """
    stopped = {"SIGKILL": 0, "SIGINT": 0}
    bad_sigint = 0
    runs = 0
    first = True
    errfile = out.parent / f"{out.name}.stderr"  # a file, not a pipe: a stray child holding a pipe would hang us
    while True:
        runs += 1
        started = time.time()
        with open(errfile, "w") as ef:
            proc = subprocess.Popen([*BNADAPT, *args, *([] if first else resume)], stdout=subprocess.DEVNULL,
                                    stderr=ef)  # fmt: skip
        first = False
        if sum(stopped.values()) < kills:
            try:
                proc.wait(timeout=rng.uniform(0.3, span))
            except subprocess.TimeoutExpired:
                wrote = _written_since(out, started)
                sig = rng.choice([signal.SIGKILL, signal.SIGINT]) if wrote else signal.SIGKILL
                proc.send_signal(sig)
                proc.wait()
                err = errfile.read_text()
                stopped[sig.name] += 1
                if sig == signal.SIGINT and proc.returncode not in (130, 0):
                    bad_sigint += 1
                    print(f"  SIGINT gave exit {proc.returncode}: {err.strip()[-300:]}", file=sys.stderr)
                elif sig == signal.SIGINT and proc.returncode == 130 and "rerun" not in err:
                    bad_sigint += 1
                continue
        proc.wait()
        if proc.returncode != 0:
            raise RuntimeError(f"run {runs} failed with exit {proc.returncode}: {errfile.read_text().strip()[-500:]}")
        time.sleep(1.5)  # orphaned workers notice their parent's death within a second
        return {"runs": runs, **stopped, "bad_sigint": bad_sigint, "orphans": _orphans(out)}


def _orphans(out: Path) -> int:
    """Processes still running whose command line names ``out`` (workers left behind by a killed run)."""
    count = 0
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(out).encode() in cmdline.read_bytes():
                count += 1
        except OSError:
            continue
    return count


def part_kill(tmp: Path, kills: int, rng: random.Random) -> list[dict]:
    x = np.random.default_rng(0).integers(0, 256, (240, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp / "in.npz", x=x, y=np.arange(240) % 10)
    folder = tmp / "folder"
    from PIL import Image

    for i in range(48):
        (folder / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.repeat(np.repeat(x[i], 2, 0), 2, 1)).save(folder / f"c{i % 3}" / f"im{i}.png")
    _checkpoint(tmp)
    bench = ["bench", "--model", "cifar10_resnet20", "--checkpoint", str(tmp / "ck.pt"), "--data",
             f"generate:cifar:{tmp / 'in.npz'}", "--corruptions", "noise", "digital", "--methods",
             "source,replace,prior", "--n", "16", "--seeds", "0,1", "--no-progress", "--no-plots"]  # fmt: skip
    cases = [
        ("bench (generate:cifar, 36 cells, 5 variants)", bench, ["--resume"], "rows", 6.0),
        ("corrupt --format cifar-c -j 2 (7 corruptions)", ["corrupt", "--input", str(tmp / "in.npz"), "--profile",
         "cifar", "--format", "cifar-c", "--corruptions", "noise", "digital", "--no-progress", "-j", "2"], [], "bytes",
         4.0),
        ("corrupt --format imagenet-c (folder, 3 corruptions)", ["corrupt", "--input", str(folder), "--profile",
         "imagenet", "--format", "imagenet-c", "--no-resize", "--corruptions", "noise", "--no-progress"], [], "bytes",
         4.0),
    ]  # fmt: skip
    table = []
    for label, args, resume, kind, span in cases:
        ref, got = tmp / "ref", tmp / "got"
        shutil.rmtree(ref, ignore_errors=True)
        shutil.rmtree(got, ignore_errors=True)
        t0 = time.perf_counter()
        r = _run([*args, "--out", str(ref)])
        if r.returncode != 0:
            raise RuntimeError(f"{label}: reference run failed: {r.stderr.strip()[-500:]}")
        span = min(span, time.perf_counter() - t0)
        stats = _interrupted([*args, "--out", str(got)], resume, kills, rng, span, got)
        if kind == "rows":
            a, b = _rows(ref), _rows(got)
            same = a == b and len({t[:6] for t in b}) == len(b)
            detail = f"{len(b)} rows"
        else:
            a, b = _files(ref), _files(got)
            same = a == b
            detail = f"{len(b)} files, {sum(map(len, b.values())) / 1e6:.1f} MB"
        leftovers = [p.name for p in got.rglob("*") if p.name.startswith(".")]
        ok = same and not leftovers and stats["bad_sigint"] == 0 and stats["orphans"] == 0
        table.append({"case": label, **stats, "ok": ok,
                      "detail": detail + (f"; left behind: {leftovers}" if leftovers else "")})  # fmt: skip
    return table


def part_disk(tmp: Path) -> list[dict]:
    if os.geteuid() != 0:
        return [{"case": "bench into a full tmpfs", "result": "skipped: needs root to mount a tmpfs", "ok": True}]
    mnt = tmp / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12k", "tmpfs", str(mnt)]).returncode != 0:
        return [{"case": "bench into a full tmpfs", "result": "skipped: mount failed", "ok": True}]
    try:
        x = np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
        np.savez(tmp / "d.npz", x=x, y=np.arange(40) % 10)
        _checkpoint(tmp)
        args = ["bench", "--model", "cifar10_resnet20", "--checkpoint", str(tmp / "ck.pt"), "--data",
                f"generate:cifar:{tmp / 'd.npz'}", "--corruptions", "noise", "--methods", "source,replace",
                "--seeds", "0-2", "--n", "8",
                "--no-progress", "--no-plots", "--out", str(mnt / "o")]  # fmt: skip
        r = _run(args)
        rows_full = _rows(mnt / "o") if (mnt / "o" / "results.jsonl").exists() else []
        lines = r.stderr.strip().splitlines()
        ok = r.returncode == 1 and len(lines) == 1 and "space" in lines[0] and rows_full
        # Space comes back: move the results to a roomy folder and resume there.
        roomy = tmp / "roomy"
        shutil.copytree(mnt / "o", roomy)
        (roomy / ".bnadapt.lock").unlink(missing_ok=True)
        r2 = _run([*args[:-1], str(roomy), "--resume"])
        ref = _run([*args[:-1], str(tmp / "ref_disk")])
        same = r2.returncode == 0 and ref.returncode == 0 and _rows(roomy) == _rows(tmp / "ref_disk")
        keys = set(_rows(roomy))
        kept = all(t in keys for t in rows_full)
        return [{"case": "bench into a 12 KiB tmpfs", "result": f"exit {r.returncode}: {lines[-1] if lines else ''}; "
                 f"{len(rows_full)} rows kept intact; resumed elsewhere: {'equal' if same else 'DIFFERENT'} to an "
                 "uninterrupted run", "ok": bool(ok and same and kept)}]  # fmt: skip
    finally:
        subprocess.run(["umount", str(mnt)])


def _peak_rss_mb(args: list[str]) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    proc = subprocess.Popen([*BNADAPT, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"bnadapt {' '.join(args)} failed: {proc.stderr.read().decode()[-500:]}")
    return usage.ru_maxrss / 1024, time.perf_counter() - t0, proc.returncode


def part_rss(tmp: Path, sizes: list[int]) -> list[dict]:
    from PIL import Image

    _checkpoint(tmp)
    rng = np.random.default_rng(0)
    table = []
    for size in sizes:
        root = tmp / f"f{size}"
        for i in range(size):
            (root / f"c{i % 10}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"c{i % 10}" / f"{i}.png")
        runs = {
            "corrupt --format cifar-c -j 2": ["corrupt", "--input", str(root), "--profile", "cifar", "--format",
                                              "cifar-c", "--corruptions", "gaussian_noise", "--severities", "3", "-j",
                                              "2", "--no-progress", "--out", str(tmp / f"c{size}")],
            "corrupt --format imagenet-c": ["corrupt", "--input", str(root), "--profile", "cifar", "--format",
                                            "imagenet-c", "--no-resize", "--corruptions", "gaussian_noise",
                                            "--severities", "3", "--no-progress", "--out", str(tmp / f"i{size}")],
            "bench --data folder: (source, replace)": ["bench", "--model", "cifar10_resnet20", "--checkpoint",
                                                       str(tmp / "ck.pt"), "--data", f"folder:{root}", "--no-progress",
                                                       "--no-plots", "--out", str(tmp / f"b{size}")],
        }  # fmt: skip
        for label, args in runs.items():
            rss, secs, _ = _peak_rss_mb(args)
            table.append({"command": label, "images": size, "peak_rss_mb": round(rss), "seconds": round(secs, 1)})
        shutil.rmtree(root)
        for d in ("c", "i", "b"):
            shutil.rmtree(tmp / f"{d}{size}", ignore_errors=True)
    return table


def _print(title: str, rows: list[dict]) -> None:
    print(f"\n### {title}\n")
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=8, help="interruptions per case (default 8)")
    ap.add_argument("--sizes", default="5000,50000", help="folder sizes for the memory part")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="kill,disk,rss", help="parts to run: kill, disk, rss")
    args = ap.parse_args()
    parts = args.only.split(",")
    ok = True
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if "kill" in parts:
            (tmp / "kill").mkdir()
            rows = part_kill(tmp / "kill", args.kills, random.Random(args.seed))
            _print("Interrupted runs (random SIGKILL / SIGINT, then resume)", rows)
            ok &= all(r["ok"] for r in rows)
        if "disk" in parts:
            (tmp / "disk").mkdir()
            rows = part_disk(tmp / "disk")
            _print("Disk full while writing results", rows)
            ok &= all(r["ok"] for r in rows)
        if "rss" in parts:
            (tmp / "rss").mkdir()
            rows = part_rss(tmp / "rss", [int(s) for s in args.sizes.split(",")])
            _print("Peak resident memory vs dataset size", rows)
            by_cmd: dict[str, list[int]] = {}
            for r in rows:
                by_cmd.setdefault(r["command"], []).append(r["peak_rss_mb"])
            growth = {c: v[-1] / v[0] for c, v in by_cmd.items()}
            print("\npeak RSS, largest / smallest size: " + ", ".join(f"{c}: {g:.2f}x" for c, g in growth.items()))
            ok &= all(g < 1.25 for g in growth.values())
    print("\nall checks passed" if ok else "\nSOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
