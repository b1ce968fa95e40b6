"""Startup time of the command line and of ``import bnadapt``, as multiples of ``python -c "import torch"`` (issue 19).

    .venv/bin/python benchmarks/bench_cli_startup.py [--repeats 7]

Each repeat runs every command once, in turn (interleaved, so a busy moment of the machine hits them all alike), as
a fresh interpreter with this checkout's src/ (or --src) first on PYTHONPATH; the table gives the median wall time
of each and its ratio to the median of ``import torch``. Issue 19's goal: ``bnadapt --help`` and usage errors
<= 0.35x.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

COMMANDS = {
    'python -c "import torch"': ["-c", "import torch"],
    "python -m bnadapt --help": ["-m", "bnadapt", "--help"],
    "python -m bnadapt bench --help": ["-m", "bnadapt", "bench", "--help"],
    "python -m bnadapt bench --model m (usage error)": ["-m", "bnadapt", "bench", "--model", "m"],
    'python -c "import bnadapt"': ["-c", "import bnadapt"],
}


def run_once(args: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--src", type=Path, default=SRC, help="the src/ folder to time (default: this checkout's)")
    args = p.parse_args()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(args.src), os.environ.get("PYTHONPATH")]))}
    for argv in COMMANDS.values():  # warm the file cache, not timed
        run_once(argv, env)
    times: dict[str, list[float]] = {k: [] for k in COMMANDS}
    for _ in range(args.repeats):
        for label, argv in COMMANDS.items():
            times[label].append(run_once(argv, env))
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med['python -c "import torch"']
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; python {platform.python_version()}; {args.src}")
    print(f"median wall time of {args.repeats} interleaved runs, each a fresh interpreter\n")
    print("| command | median s | x import torch |")
    print("|---|---|---|")
    for label, t in med.items():
        print(f"| `{label}` | {t:.3f} | {t / base:.2f}x |")


if __name__ == "__main__":
    main()
