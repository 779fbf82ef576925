"""Bad configs are refused before any work, with the valid choices listed.

"Before any work" is checked literally: the project folder gets no data/, no
data.dvc, no MLflow store and no outputs/ when the CLI or the flow refuses.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from peftflow.cli.main import app
from peftflow.config.loading import parse_config
from peftflow.errors import ConfigError
from peftflow.models.facts import facts_from_config, model_facts
from peftflow.models.methods.registry import METHODS
from peftflow.task.preflight import preflight
from tests.conftest import minilm_folder, synthetic_spam_table

runner = CliRunner()


def config(model_dir: Path | str, **sections) -> dict:
    base = {
        "name": "refused",
        "data": {"source": "table", "path": "messages.csv"},
        "model": {"name": str(model_dir), "max_length": 64},
        "method": {"name": "lora"},
    }
    for section, fields in sections.items():
        base[section] = {**base.get(section, {}), **fields} if isinstance(fields, dict) else fields
    return base


def test_unknown_method_lists_every_registry_method():
    with pytest.raises(ConfigError) as err:
        parse_config(config("minilm", method={"name": "loar"}))
    assert "unknown method 'loar'" in str(err.value)
    assert f"valid methods: {', '.join(sorted(METHODS))}" in str(err.value)


def test_unknown_option_names_the_closest_field_and_lists_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        parse_config(config("minilm", train={"epochz": 2}, method={"name": "lora", "rr": 4}))
    message = str(err.value)
    assert "train.epochz: unknown field; did you mean 'epochs'?" in message
    assert "valid fields here: batch_size," in message
    assert "method.rr: unknown field; did you mean 'r'?" in message


def test_method_for_another_task_is_refused_when_parsed():
    with pytest.raises(ConfigError, match="does not apply to task 'generation'.*valid methods"):
        parse_config(config("smollm2-135m", task="generation", method={"name": "last_layer"}))


def test_bitfit_on_a_bias_free_model_lists_the_methods_that_fit(tiny_models):
    cfg = parse_config(config(tiny_models["llama"], method={"name": "bitfit"}))
    with pytest.raises(ConfigError) as err:
        preflight(cfg, cuda_available=False)
    message = str(err.value)
    assert "method 'bitfit' trains bias terms only, and llama models have none" in message
    listed = message.split("methods that run for this model and task here: ")[1].split(", ")
    assert "lora" in listed and "bitfit" not in listed and "qlora" not in listed


def test_qlora_without_a_gpu_is_refused_with_the_cpu_methods(tiny_models):
    cfg = parse_config(config(tiny_models["bert"], method={"name": "qlora"}))
    with pytest.raises(ConfigError, match="method 'qlora' needs a CUDA GPU; methods that run"):
        preflight(cfg, cuda_available=False)
    assert preflight(cfg, cuda_available=True).family == "encoder"  # the GPU is the only issue


def test_max_length_beyond_the_context_is_refused(tiny_models):
    cfg = parse_config(config(tiny_models["bert"], model={"max_length": 256}))
    with pytest.raises(
        ConfigError,
        match="model.max_length 256 exceeds .* context of 128 "
        "positions; set model.max_length to at most 128",
    ):
        preflight(cfg, cuda_available=False)


def test_every_problem_is_reported_at_once(tiny_models):
    cfg = parse_config(
        config(
            tiny_models["bert"],
            model={"max_length": 512, "causal_mask": False},
            method={"name": "qlora"},
        )
    )
    with pytest.raises(ConfigError) as err:
        preflight(cfg, cuda_available=False)
    problems = [line for line in str(err.value).splitlines() if line.startswith("  - ")]
    assert len(problems) == 3, str(err.value)  # the GPU, the length and the knob


def test_known_aliases_record_the_facts_their_config_json_has():
    """The static facts that let preflight skip weight conversion match the real files."""
    real = json.loads((minilm_folder() / "config.json").read_text())
    assert model_facts("minilm", None) == facts_from_config(real, "encoder")


def test_generation_prompt_tuning_on_gpt2_is_refused_before_any_work(tiny_models):
    cfg = parse_config(
        config(
            tiny_models["gpt2"],
            task="generation",
            method={"name": "prompt_tuning"},
            model={"padding_side": "left"},
        )
    )
    with pytest.raises(ConfigError, match="prompt_tuning.* on gpt2.*left-padded"):
        preflight(cfg, cuda_available=False)


def test_virtual_token_methods_on_gpt2_are_refused_only_when_left_padded(tiny_models):
    """A classifier left-padded on GPT-2's learned positions has the same problem as a
    generator: the virtual tokens' positions would count the pads."""
    left = {"padding_side": "left"}
    refused = parse_config(config(tiny_models["gpt2"], method={"name": "p_tuning"}, model=left))
    with pytest.raises(ConfigError, match="p_tuning.* on gpt2.*left-padded"):
        preflight(refused, cuda_available=False)
    right = parse_config(config(tiny_models["gpt2"], method={"name": "p_tuning"}))
    assert preflight(right, cuda_available=False).model_type == "gpt2"


def write_project(root: Path, cfg: dict) -> Path:
    root.mkdir(parents=True)
    synthetic_spam_table(60)[["text", "label"]].to_csv(root / "messages.csv", index=False)
    cfg = {**cfg, "data": {**cfg["data"], "path": str(root / "messages.csv")}}
    cfg["tracking"] = {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}"}
    path = root / "experiment.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def nothing_written(root: Path) -> bool:
    return sorted(p.name for p in root.iterdir()) == ["experiment.yaml", "messages.csv"]


def test_cli_run_refuses_before_any_work(tiny_models, tmp_path):
    root = tmp_path / "project"
    path = write_project(root, config(tiny_models["bert"], method={"name": "qlora"}))
    result = runner.invoke(app, ["run", "--config", str(path), "--root", str(root)])
    assert result.exit_code == 2
    assert "method 'qlora' needs a CUDA GPU" in result.output
    assert nothing_written(root)


@pytest.mark.server
def test_the_flow_refuses_before_any_work(prefect_server, tiny_models, tmp_path):
    """Deployments call the flow directly: it runs the same checks as its first task."""
    from flows.finetune import finetune

    root = tmp_path / "project"
    path = write_project(root, config(tiny_models["bert"], model={"max_length": 4096}))
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    with pytest.raises(ConfigError, match="context of 128 positions"):
        finetune(config_path=str(path), root=str(root))
    assert sorted(p.name for p in root.iterdir()) == [".git", "experiment.yaml", "messages.csv"]
