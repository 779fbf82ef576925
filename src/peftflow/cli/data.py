"""``peftflow data ...``: check and repair the DVC-tracked data.

Depends on: data.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import typer

from peftflow.cli.common import fail
from peftflow.errors import PeftflowError

data_app = typer.Typer(help="Check and repair the DVC-tracked data.", no_args_is_help=True)


@data_app.command("verify")
def data_verify(
    root: Path = typer.Option(Path("."), help="Project folder (data/ and data.dvc live here)."),
    target: str = typer.Option("data", help="The DVC-tracked folder (data.data_dir)."),
    repair: bool = typer.Option(
        False, "--repair", help="Restore bad copies: cache from data/ or the remote, then data/."
    ),
    remote: bool = typer.Option(
        False,
        "--remote",
        help="Also re-hash the default remote's copies (streamed); with --repair, re-upload "
        "the bad or missing ones from the verified cache.",
    ),
) -> None:
    """Re-hash data/ and its DVC cache objects against data.dvc; exit 2 on any mismatch."""
    from peftflow.data import dvc_integrity as integrity  # deferred: DVC (~1 s)

    try:
        with contextlib.redirect_stdout(sys.stderr):  # DVC's progress output
            restored = integrity.repair(root, target) if repair else []
            check = integrity.verify(root, target)
            in_remote = None
            if remote and repair:
                uploaded, in_remote = integrity.repair_remote(root, target)
                restored += uploaded
            elif remote:
                in_remote = integrity.verify_remote(root, target)
    except PeftflowError as err:
        fail(err)
    for line in restored:
        typer.echo(f"restored {line}")
    bad = check.cache + check.workspace + (in_remote.bad if in_remote else ())
    if bad:
        problems = "\n".join(f"  - {item.describe()}" for item in bad)
        message = f"data {check.data_md5} differs from {target}.dvc:\n{problems}\n"
        fail(PeftflowError(message + _verify_fix(target, remote)))
    typer.echo(f"data {check.data_md5}: {check.n_files} files, cache and {target}/ ok")
    if in_remote is not None:
        typer.echo(f"remote {in_remote.url}: {in_remote.n_objects} objects ok")


@data_app.command("deliver")
def data_deliver(
    release: str = typer.Option(..., help="SpamAssassin release to deliver: 2002 or 2003."),
    into: Path = typer.Option(Path("inbox"), help="The mail folder (data.path, source 'folder')."),
    root: Path = typer.Option(Path("."), help="Project folder (the corpus is cached under it)."),
) -> None:
    """Drop one SpamAssassin release into a labelled mail folder, as new mail would arrive."""
    from peftflow.data.mail_folder import deliver  # deferred: keeps `--help` fast

    try:
        added = deliver(release, root / into, root / ".cache" / "peftflow")
    except PeftflowError as err:
        fail(err)
    counts = ", ".join(f"{n} {label}" for label, n in added.items())
    typer.echo(f"delivered SpamAssassin {release} into {into}: {counts} new messages")


def _verify_fix(target: str, remote: bool) -> str:
    fix = (
        "Run `peftflow data verify --repair` to restore the cache (from data/ or the remote) "
        f"and {target}/ (from the cache)"
    )
    if remote:
        fix = fix.replace("--repair", "--repair --remote") + ", and the remote (from the cache)"
    return fix + "."
