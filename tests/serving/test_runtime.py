"""The serving runtime a logged model carries: exactly the modules serving imports, and its
requirements name every package they import."""

from __future__ import annotations

import json
import subprocess
import sys

from peftflow.serving.runtime import RUNTIME_MODULES, RUNTIME_PACKAGES, runtime_requirements

PROBE = """
import json, sys
import peftflow.serving.pyfunc_entry
mods = sorted(m.__file__ for n, m in sys.modules.items() if n.startswith("peftflow") and m.__file__)
top = sorted({n.split(".")[0] for n in sys.modules})
print(json.dumps({"files": mods, "top": top}))
"""

NEVER_IN_SERVING = {"great_expectations", "dvc", "prefect", "sklearn", "sacrebleu", "evaluate"}


def imported_by_entry_point() -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.splitlines()[-1])


def test_runtime_modules_are_exactly_what_the_entry_point_imports():
    found = imported_by_entry_point()
    relative = sorted(path.split("/peftflow/", 1)[1] for path in found["files"])
    assert relative == sorted(RUNTIME_MODULES), (
        "update peftflow.serving.runtime.RUNTIME_MODULES: serving now imports "
        f"{sorted(set(relative) - set(RUNTIME_MODULES))} and no longer "
        f"{sorted(set(RUNTIME_MODULES) - set(relative))}"
    )
    assert not NEVER_IN_SERVING & set(found["top"])


def test_runtime_requirements_pin_every_package_exactly():
    pins = runtime_requirements()
    assert len(pins) == len(RUNTIME_PACKAGES)
    assert "torch==2.13.0" in pins  # local label "+cpu" dropped so GPU installs match
    assert all("==" in pin and "+" not in pin for pin in pins)
