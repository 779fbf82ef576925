"""Which precision a run trains in: train.precision resolved against the device."""

from __future__ import annotations

import logging

import pytest
import torch

from peftflow.training import precision
from peftflow.training.precision import autocasts, warn_if_emulated

CPU = torch.device("cpu")


@pytest.mark.parametrize("native", [True, False])
def test_native_picks_bf16_only_where_the_hardware_has_it(native, monkeypatch):
    monkeypatch.setattr(precision, "native_bf16", lambda device: native)
    assert autocasts(CPU, "native") is native
    assert autocasts(CPU, "auto") is False  # on a CPU, bf16 changes results: opt-in only
    assert autocasts(CPU, "bf16") is True and autocasts(CPU, "fp32") is False


def test_auto_is_bf16_on_a_gpu_that_has_it(monkeypatch):
    monkeypatch.setattr(precision, "native_bf16", lambda device: device.type == "cuda")
    assert autocasts(torch.device("cuda"), "auto") is True
    assert autocasts(CPU, "auto") is False


def test_native_bf16_of_this_cpu_is_what_onednn_says():
    assert precision.native_bf16(CPU) is bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def test_bf16_asked_for_on_emulating_hardware_is_said_out_loud(monkeypatch, caplog):
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    with caplog.at_level(logging.WARNING, logger="peftflow.training"):
        warn_if_emulated(CPU, "bf16")
        warn_if_emulated(CPU, "native")  # resolves to fp32 here: nothing to say
    assert len(caplog.records) == 1
    assert "emulated" in caplog.text and "train.precision: native" in caplog.text
