"""Exceptions whose message tells the user what went wrong and what to do.

Depends on: nothing in peftflow.
"""

from __future__ import annotations


class PeftflowError(Exception):
    """Base class: the message is meant for a human and names the fix."""


class ConfigError(PeftflowError):
    """An experiment config is invalid (unknown field, bad value, bad combination)."""


class DataError(PeftflowError):
    """Input data is unusable (missing file, wrong columns, bad labels, bad archive)."""


class FetchError(DataError):
    """Downloading the data failed (network, registry): worth retrying, unlike other errors."""


class IntegrityError(DataError):
    """Downloaded or cached bytes do not match their recorded checksum."""


class DataCheckError(PeftflowError):
    """A Great Expectations suite failed; ``report`` holds the readable details."""

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report or {}


class TrainingError(PeftflowError):
    """Training cannot continue (non-finite loss, unsupported device, ...)."""


class RegistryError(PeftflowError):
    """A registry operation was refused or failed (reload check, gate, missing model)."""
