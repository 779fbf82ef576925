"""Bounded retries of model-registry calls that failed for a passing reason.

Runs that finish together write to one store at once. A SQLite store answers "database
is locked" when a writer waits longer than its busy timeout, and a tracking server answers
429 or 5xx, or drops the connection, while it is overloaded or restarting. Those errors say
nothing about the request itself, so the call is tried again after a short, jittered,
growing pause; any other error (a missing model, a bad value, a refused permission) is
raised at once. The number of attempts is bounded, so a registry that stays down stops the
caller with an error that names the operation and the fix.

Depends on: nothing in peftflow.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

from mlflow.exceptions import MlflowException

from peftflow.errors import RegistryError

T = TypeVar("T")

# HTTP statuses that mean "try again later" (as MLflow's own HTTP client treats them).
# MlflowException maps a local store's "database is locked" to 503 and a lost connection
# to 500, so one rule covers the SQLite store and a server alike.
TRANSIENT_HTTP_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
ATTEMPTS = 4
FIRST_DELAY_S = 0.5
MAX_DELAY_S = 8.0


def is_transient(error: MlflowException) -> bool:
    """True when ``error`` says the store was busy or unreachable, not that the call was wrong."""
    return (
        error.get_http_status_code() in TRANSIENT_HTTP_STATUSES
        or "database is locked" in str(error).lower()
    )


def backoff_s(attempt: int, first_delay_s: float = FIRST_DELAY_S) -> float:
    """Pause after failed attempt ``attempt`` (1-based): doubling, capped, with jitter.

    The jitter (up to +50%) keeps callers that failed together from retrying together.
    """
    delay = min(first_delay_s * 2 ** (attempt - 1), MAX_DELAY_S)
    return delay * (1 + random.random() / 2)


def retry_transient(
    call: Callable[[], T],
    doing: str,
    attempts: int = ATTEMPTS,
    first_delay_s: float = FIRST_DELAY_S,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """``call()``, tried up to ``attempts`` times while it fails with a transient store error.

    ``call`` must be safe to repeat: a store can commit a write and still report an error,
    so a retried create must first look for what the failed attempt may have written.
    Raises the first non-transient error unchanged, and :class:`RegistryError` naming
    ``doing`` when every attempt failed.
    """
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except MlflowException as error:
            if not is_transient(error):
                raise
            if attempt == attempts:
                raise RegistryError(
                    f"model registry kept failing while {doing} ({attempts} attempts, last: "
                    f"{error.error_code}: {error.message}). Check that the tracking server or "
                    "database is up and not overloaded, then run the command again."
                ) from error
            sleep(backoff_s(attempt, first_delay_s))
    raise AssertionError("unreachable: the loop returns or raises")
