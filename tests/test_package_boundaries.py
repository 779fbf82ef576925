"""The package never imports Prefect; the offline switches are set in one place."""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys

import peftflow


def test_no_peftflow_module_imports_prefect():
    found = pkgutil.walk_packages(peftflow.__path__, "peftflow.")
    modules = [m.name for m in found if not m.name.endswith("__main__")]  # __main__ runs the CLI
    assert "peftflow.pipeline.stages" in modules and "peftflow.cli.main" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "leaked = sorted(m for m in sys.modules if m == 'prefect' or m.startswith('prefect.'))\n"
        "print(len(leaked))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "0"


def test_offline_switches_are_set_on_import():
    switches = ("HF_HUB_OFFLINE", "DVC_NO_ANALYTICS")
    code = f"import os, peftflow; print(*(os.environ[k] for k in {switches!r}))"
    env = {k: v for k, v in os.environ.items() if k not in switches}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.stdout.split() == ["1", "1"]
