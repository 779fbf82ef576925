"""The C allocator choice: settings, library search, the re-exec environment, the console script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from peftflow.errors import ConfigError
from peftflow.training import allocator


@pytest.fixture
def no_tcmalloc_anywhere(monkeypatch, tmp_path):
    """Neither the venv nor any system folder holds tcmalloc."""
    monkeypatch.setattr(allocator.sys, "prefix", str(tmp_path / "venv"))
    monkeypatch.setattr(allocator, "SYSTEM_LIBRARY_DIRS", ())


@pytest.fixture
def fake_library(tmp_path) -> Path:
    library = tmp_path / "lib" / "libtcmalloc_minimal.so.4"
    library.parent.mkdir()
    library.write_bytes(b"\x7fELF")
    return library


def test_setting_defaults_to_auto_and_refuses_unknown_values():
    assert allocator.setting({}) == "auto"
    assert allocator.setting({"PEFTFLOW_ALLOCATOR": " TCMalloc "}) == "tcmalloc"
    with pytest.raises(ConfigError, match="'jemalloc' is not one of auto, tcmalloc, system"):
        allocator.setting({"PEFTFLOW_ALLOCATOR": "jemalloc"})


def test_library_is_found_explicitly_then_in_the_venv(monkeypatch, tmp_path, fake_library):
    assert allocator.find_tcmalloc({"PEFTFLOW_TCMALLOC": str(fake_library)}) == fake_library
    with pytest.raises(ConfigError, match="no such file; install it .*PEFTFLOW_ALLOCATOR=system"):
        allocator.find_tcmalloc({"PEFTFLOW_TCMALLOC": str(tmp_path / "missing.so")})
    monkeypatch.setattr(allocator, "SYSTEM_LIBRARY_DIRS", ())
    monkeypatch.setattr(allocator.sys, "prefix", str(tmp_path))  # the venv's lib/ is tmp/lib
    assert allocator.find_tcmalloc({}) == fake_library


def test_preload_env_prepends_tcmalloc_once(monkeypatch, fake_library):
    monkeypatch.setattr(allocator, "loaded_allocator", lambda: "glibc")
    base = {"PEFTFLOW_TCMALLOC": str(fake_library), "LD_PRELOAD": "/opt/other.so", "KEEP": "1"}
    env = allocator.preload_env(base)
    assert env["LD_PRELOAD"] == f"{fake_library}:/opt/other.so"
    assert env["PEFTFLOW_ALLOCATOR_REEXECUTED"] == "1" and env["KEEP"] == "1"
    assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 2**40  # no large-alloc spam
    # The re-executed process (or one whose preload the loader ignored) never loops.
    assert allocator.preload_env(env) is None
    assert allocator.preload_env({**base, "PEFTFLOW_ALLOCATOR": "system"}) is None
    monkeypatch.setattr(allocator, "loaded_allocator", lambda: "tcmalloc")
    assert allocator.preload_env(base) is None  # already running under it


def test_missing_tcmalloc_is_fine_on_auto_and_an_error_when_asked_for(no_tcmalloc_anywhere):
    assert allocator.preload_env({}) is None
    with pytest.raises(ConfigError, match="PEFTFLOW_ALLOCATOR=tcmalloc but no tcmalloc was found"):
        allocator.preload_env({"PEFTFLOW_ALLOCATOR": "tcmalloc"})


def test_loaded_allocator_reads_the_process_maps(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00 r-xp /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert allocator.loaded_allocator(maps) == "glibc"
    maps.write_text(maps.read_text() + "7f01 r-xp /x/.venv/lib/libtcmalloc_minimal.so.4\n")
    assert allocator.loaded_allocator(maps) == "tcmalloc"
    assert allocator.loaded_allocator(tmp_path / "absent") == "unknown"


def _console_estimate(config: Path, **env: str) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("peftflow")
    argv = [str(script), "estimate", "--config", str(config), "--json"]
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PEFTFLOW_", "LD_PRELOAD"))}
    return subprocess.run(argv, capture_output=True, text=True, env={**clean, **env}, timeout=300)


@pytest.mark.slow
def test_console_script_trains_under_tcmalloc_when_found(tiny_models, tmp_path):
    """`peftflow` re-executes itself with tcmalloc preloaded; `system` keeps glibc."""
    if allocator.find_tcmalloc({}) is None:
        pytest.skip("no tcmalloc on this machine (`make setup` fetches it where apt works)")
    config = tmp_path / "tiny.yaml"
    tiny = {"name": "tiny", "model": {"name": str(tiny_models["llama"]), "max_length": 32}}
    config.write_text(json.dumps({**tiny, "train": {"device": "cpu"}}))
    for wanted, expected in (("tcmalloc", "allocator: tcmalloc"), ("system", "allocator: glibc")):
        result = _console_estimate(config, PEFTFLOW_ALLOCATOR=wanted)
        assert result.returncode == 0, result.stderr
        notes = json.loads(result.stdout)["notes"]
        assert any(note.startswith(expected) for note in notes), notes
    refused = _console_estimate(config, PEFTFLOW_TCMALLOC=str(tmp_path / "none.so"))
    assert refused.returncode == 2 and "PEFTFLOW_TCMALLOC=" in refused.stderr
