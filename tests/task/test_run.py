"""peftflow.task.run: the tags that say how a run trained."""

from __future__ import annotations

import pytest

from peftflow.config import parse_config
from peftflow.task.run import outcome_tags
from peftflow.training.loop import TrainOutcome


@pytest.mark.parametrize(
    ("model", "train", "expected"),
    [
        ({}, {"precision": "fp32"}, "fp32"),
        ({}, {"precision": "bf16"}, "bf16-autocast"),
        ({}, {"precision": "auto"}, "fp32"),  # auto: bf16 on GPUs only
        ({"dtype": "bfloat16"}, {"precision": "fp32"}, "bf16"),  # the weights themselves
    ],
)
def test_the_precision_tag_is_what_the_loop_ran(model, train, expected):
    cfg = parse_config({"name": "x", "model": model, "train": train})
    tags = outcome_tags(TrainOutcome(device="cpu"), cfg)
    assert tags["peftflow.precision"] == expected
    assert tags["peftflow.device"] == "cpu"
    assert "peftflow.ddp.processes" not in tags  # one process: no data-parallel tags
