"""Startup: `import bnadapt` and the command line's help and usage errors load no heavy module; names stay complete.

The heavy imports are checked in fresh interpreters (this one has imported everything already).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import bnadapt
from bnadapt.adapt import method_spec, register_method, unregister_method
from bnadapt.cli import main
from bnadapt.names import BUILTIN_METHODS

SRC = str(Path(bnadapt.__file__).resolve().parents[1])
HEAVY = ("torch", "numpy", "scipy", "PIL", "tqdm", "cv2", "sklearn", "matplotlib")
FAMILIES = tuple(f"bnadapt.corruptions.{m}" for m in ("noise", "blur", "weather", "digital", "snow"))

# Runs its code, then prints which modules of interest were loaded, as the last line of stdout.
_REPORT = """
import sys, json
{code}
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {heavy} or m.startswith("bnadapt"))))
"""

# `python -m bnadapt ARGS`, with the argparse exit caught so that the report still runs.
_CLI = """
import runpy
sys.argv = ["bnadapt", *{argv}]
try:
    runpy.run_module("bnadapt", run_name="__main__", alter_sys=True)
except SystemExit as e:
    print("exit", e.code)
"""


def _loaded(code: str) -> tuple[set[str], str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")]))}
    script = _REPORT.format(code=code, heavy=repr(HEAVY))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    *out, last = res.stdout.strip().splitlines()
    return set(json.loads(last)), "\n".join(out) + res.stderr


def test_import_loads_nothing_heavy():
    mods, _ = _loaded("import bnadapt")
    assert not {m.split(".")[0] for m in mods} & set(HEAVY), mods
    assert not mods & {"bnadapt.corruptions", *FAMILIES}, mods


@pytest.mark.parametrize(
    ("argv", "code", "says"),
    [
        (["--help"], 0, "bench"),
        (["adapt", "--help"], 0, "--method NAME"),
        (["bench", "--help"], 0, "--setting"),
        (["analyze", "--help"], 0, "transfer"),
        (["bench", "--model", "m"], 2, "required: --data, --out"),
        (["analyze", "sideways"], 2, "invalid choice"),
        (["nope"], 2, "invalid choice"),
    ],
)
def test_help_and_usage_errors_load_nothing_heavy(argv, code, says):
    mods, out = _loaded(_CLI.format(argv=argv))
    assert f"exit {code}" in out and says in out, out
    assert not {m.split(".")[0] for m in mods} & set(HEAVY), mods


def test_a_submodule_import_does_not_replace_adapt():
    # What the import system does when bnadapt.adapt (the module) loads: bind it on the package. The function keeps
    # the name (checked without loading torch; test_submodule_first_then_names does it for real).
    _, out = _loaded(
        "import types, bnadapt\n"
        "bnadapt.adapt = types.ModuleType('bnadapt.adapt')\n"
        "bnadapt.other = types.ModuleType('bnadapt.other')\n"
        "print('adapt' in vars(bnadapt), isinstance(bnadapt.other, types.ModuleType))"
    )
    assert "False True" in out


@pytest.mark.slow
def test_submodule_first_then_names():
    _, out = _loaded(
        "from bnadapt.adapt import method_names\n"
        "import bnadapt, inspect\n"
        "print(method_names(), inspect.isfunction(bnadapt.adapt), bnadapt.corrupt.__module__)"
    )
    assert f"{list(BUILTIN_METHODS)} True bnadapt.corruptions" in out


def test_builtin_method_names_match_the_registry():
    builtin = [m for m in bnadapt.method_names() if method_spec(m).fn.__module__.startswith("bnadapt.methods.")]
    assert tuple(builtin) == BUILTIN_METHODS


def test_public_names_resolve_and_are_listed():
    assert set(bnadapt.__all__) <= set(dir(bnadapt))
    for name in bnadapt.__all__:
        assert getattr(bnadapt, name) is not None, name
    assert callable(bnadapt.adapt) and not isinstance(bnadapt.adapt, type(bnadapt))
    assert bnadapt.corruptions.corrupt is bnadapt.corrupt  # submodules, as when __init__ imported them all
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        bnadapt.nope  # noqa: B018


@pytest.fixture
def keep_method():
    @register_method("keep-it", images="unused")
    def keep_it(model, images, cfg, layers):
        return model

    yield "keep-it"
    unregister_method("keep-it")


def test_adapt_takes_a_method_registered_at_run_time(tmp_path, resnet20_checkpoint, keep_method, capsys):
    x = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "imgs.npz", x=x, y=np.zeros(8, np.int64))
    args = ["adapt", "--model", "cifar10_resnet20", "--checkpoint", str(tmp_path / "ck.pt"), "--images",
            str(tmp_path / "imgs.npz"), "--n", "8", "--method"]  # fmt: skip
    assert main([*args, "nope", "--out", str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert "argument --method: invalid choice: 'nope'" in err and "'keep-it'" in err and len(err.splitlines()) == 1
    assert main([*args, keep_method, "--out", str(tmp_path / "o.safetensors")]) == 0
    assert (tmp_path / "o.safetensors").is_file()
