"""The git state of the code that produced a run, recorded as MLflow tags.

A run is only reproducible from its commit when the working tree was clean,
so both the commit and the dirty flag are recorded. Outside a git checkout (an
installed wheel, a container without ``.git``) neither is knowable, and that
must not stop a training run: the answers degrade to "unknown" / ``False``.

Depends on: nothing in peftflow.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

UNKNOWN_COMMIT = "unknown"


def _git(root: Path, *args: str) -> str | None:
    """Stdout of ``git -C root ARGS``, or None when git or the repository is unavailable."""
    try:
        result = subprocess.run(
            ["git", "-C", str(root), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def git_commit(root: Path) -> str:
    """Full SHA of HEAD, or "unknown" outside git (or before the first commit)."""
    return _git(root, "rev-parse", "HEAD") or UNKNOWN_COMMIT


def git_dirty(root: Path) -> bool:
    """True when tracked files differ from HEAD.

    Untracked files are ignored: outputs and data live in git-ignored folders,
    and a stray scratch file does not change what the committed code does.
    """
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    return bool(status)
