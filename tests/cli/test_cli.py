"""The command line: help on every command, method listing, config validation."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from peftflow.cli.main import app
from peftflow.models.methods.registry import METHODS

runner = CliRunner()


@pytest.mark.parametrize("command", ["run", "demo", "ingest", "methods", "config"])
def test_every_command_has_help(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_methods_json_lists_the_registry():
    result = runner.invoke(app, ["methods", "--json"])
    assert result.exit_code == 0
    listing = json.loads(result.output)
    assert [entry["name"] for entry in listing] == list(METHODS)


def test_config_prints_defaults_and_hash():
    result = runner.invoke(
        app, ["config", "configs/experiments/demo.yaml", "--set", "train.epochs=5"]
    )
    assert result.exit_code == 0, result.output
    assert "epochs: 5" in result.output and "# config hash:" in result.output


def test_bad_config_exits_2_with_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmethod: {name: nope}\n")
    result = runner.invoke(app, ["config", str(bad)])
    assert result.exit_code == 2
    assert "unknown method 'nope'; valid methods:" in result.output


def test_malformed_override_is_rejected():
    result = runner.invoke(app, ["config", "configs/experiments/demo.yaml", "--set", "epochs"])
    assert result.exit_code != 0
    assert "KEY=VALUE" in result.output


def test_ingest_versions_a_user_table_with_dvc(tmp_path, spam_table):
    import subprocess

    import yaml

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    spam_table[["text", "label"]].to_csv(tmp_path / "messages.csv", index=False)
    config = tmp_path / "exp.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "cli-ingest",
                "data": {"source": "table", "path": str(tmp_path / "messages.csv")},
            }
        )
    )
    result = runner.invoke(app, ["ingest", "--config", str(config), "--root", str(tmp_path)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["n_rows"] == len(spam_table)
    assert summary["label_counts"] == spam_table["label"].value_counts().to_dict()
    assert summary["data_md5"] in (tmp_path / "data.dvc").read_text()
    assert (tmp_path / ".dvc-storage").is_dir()  # pushed to the default local remote


def test_ingest_of_a_missing_file_exits_2_and_writes_nothing(tmp_path):
    config = tmp_path / "exp.yaml"
    config.write_text(f"name: x\ndata: {{source: table, path: {tmp_path / 'nope.csv'}}}\n")
    result = runner.invoke(app, ["ingest", "--config", str(config), "--root", str(tmp_path)])
    assert result.exit_code == 2
    assert "nope.csv" in result.output
    assert not (tmp_path / "data.dvc").exists() and not (tmp_path / "data").exists()


def test_the_docs_methods_table_is_generated_from_the_registry():
    from pathlib import Path

    from peftflow.models.methods.registry import methods_markdown

    page = (Path(__file__).resolve().parents[2] / "docs" / "methods.md").read_text()
    start, end = "<!-- methods:start -->\n", "\n<!-- methods:end -->"
    assert start in page and end in page, "docs/methods.md lost its generated table markers"
    table = page.split(start, 1)[1].split(end, 1)[0]
    assert table == methods_markdown(), "paste `peftflow methods --markdown` in docs/methods.md"
