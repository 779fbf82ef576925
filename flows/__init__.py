"""Prefect flows: they only wire the tasks in ``tasks/``."""

from pathlib import Path


def entry_point(module_file: str, flow_name: str) -> str:
    """``flows/<file>.py:<flow>``, as prefect.yaml names it: MLflow's source name on runs."""
    return f"flows/{Path(module_file).name}:{flow_name}"
