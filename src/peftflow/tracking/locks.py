"""A lock per registered model, kept in the MLflow registry, that serialises promotions.

Promotion reads the champion, compares and moves aliases: check-then-act. Runs that finish
together may be threads, processes or hosts; the one thing they all share is the tracking
store, so the lock lives there and works the same against a server and a SQLite file.

It is a ticket lock. The lock of model ``M`` is the registered model ``M.peftflow-lock``;
each contender registers a version of it, its ticket, and holds the lock when no live
ticket has a lower number. The store hands out version numbers atomically (a unique
(name, version) key, next = max + 1, retried on conflict) and never reuses the number of a
deleted version, so tickets are totally ordered, waiters are served first come first
served, and a ticket can be deleted by number without ever hitting someone else's.

A contender refreshes its ticket while it waits (``update_model_version`` stamps the
store's clock on it) and a holder refreshes it between writes; a ticket silent for
``ttl_s`` by the store's clock belongs to a process that died and is deleted by whoever
waits behind it, so host clocks need not agree. A holder that went silent for most of
``ttl_s`` stops writing (:meth:`RegistryLock.check`). Waiting is bounded by ``timeout_s``;
the error names the blocking ticket, its holder and how to delete it.

Why not a registered model created and deleted by name as the lock: taking over a dead
holder's lock then means deleting by name, and two waiters that both saw it stale can
delete a fresh lock a third process just created under the same name.

Depends on: nothing in peftflow.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import threading
import time
import uuid
from types import TracebackType
from typing import Any, Self

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from peftflow.errors import RegistryError
from peftflow.retry import retry_transient

LOCK_SUFFIX = ".peftflow-lock"
LOCK_TAG = "peftflow.lock"
TOKEN_TAG = "peftflow.lock.token"
HOLDER_TAG = "peftflow.lock.holder"
# Tickets point at no model; a source with a scheme passes the server's source checks.
TICKET_SOURCE = "peftflow-lock:/ticket"
LEASE_S = 60.0  # a promotion holds the lock for about a second
WAIT_S = 150.0  # more than LEASE_S: a dead holder is taken over within one call
FIRST_POLL_S = 0.05
MAX_POLL_S = 1.0
# A holder stops writing once this share of its lease has passed without a refresh,
# leaving a margin for the request in flight when the lease runs out.
SAFE_SHARE = 0.8
NOT_FOUND = "RESOURCE_DOES_NOT_EXIST"

logger = logging.getLogger(__name__)


def lock_model_name(model_name: str) -> str:
    return f"{model_name}{LOCK_SUFFIX}"


def is_lock_model(name: str) -> bool:
    """True for the registry's lock objects, which are not models: listings must skip them."""
    return name.endswith(LOCK_SUFFIX)


def holder_id(purpose: str) -> str:
    """Who holds a ticket, for people reading the registry: host, pid, thread, purpose."""
    return f"{socket.gethostname()} pid {os.getpid()} thread {threading.get_ident()}: {purpose}"


class LockTimeout(RegistryError):
    """The lock stayed held by another live holder for longer than the caller would wait."""


class RegistryLock:
    """Mutual exclusion per registered model, across threads, processes and hosts.

    Use as a context manager; the body runs while no other holder exists, and it calls
    :meth:`check` before each write.
    """

    def __init__(
        self,
        client: MlflowClient,
        model_name: str,
        purpose: str,
        ttl_s: float = LEASE_S,
        timeout_s: float = WAIT_S,
    ):
        if "'" in model_name:
            raise RegistryError(
                f"model name {model_name!r} contains a quote, which registry filters cannot "
                "match; rename the registered model without quotes."
            )
        self.client, self.model_name = client, model_name
        self.name = lock_model_name(model_name)
        self.ttl_s, self.timeout_s = ttl_s, timeout_s
        self.holder = holder_id(purpose)
        self.token = uuid.uuid4().hex
        self.ticket: int | None = None
        self._refreshed_at = 0.0  # time.monotonic() when the last refresh was sent

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            self.release()
        except (MlflowException, RegistryError) as error:
            # The body's writes are done; a ticket left behind only delays the next holder
            # by one lease, so this must not turn a finished promotion into a failure.
            logger.warning("%s; it expires by itself after %.0f s", error, self.ttl_s)

    def acquire(self) -> None:
        """Take a ticket and wait for the turn; LockTimeout after ``timeout_s``."""
        self._refreshed_at = time.monotonic()
        created = self._take_ticket()
        self.ticket = int(created.version)
        try:
            self._wait_turn(created.last_updated_timestamp)
        except BaseException:
            # Also on Ctrl-C: leave no live ticket behind (one left expires after ttl_s).
            with contextlib.suppress(MlflowException, RegistryError):
                self.release()
            raise

    def release(self) -> None:
        """Delete this holder's ticket; a ticket already gone (taken over) is fine."""
        if self.ticket is not None:
            self._delete(self.ticket)
            self.ticket = None

    def check(self) -> None:
        """Before a write: fail if the lease may have run out, refresh it when half-used."""
        silent_s = time.monotonic() - self._refreshed_at
        if self.ticket is None or silent_s > self.ttl_s * SAFE_SHARE:
            raise RegistryError(
                f"the promotion lock of model {self.model_name!r} ({self.name!r}) was held for "
                f"{silent_s:.0f} s without a refresh, past its {self.ttl_s:.0f} s lease, so "
                "another process may have taken it over; nothing more was written. Check "
                "that the tracking server answers quickly, then run the command again."
            )
        if silent_s > self.ttl_s / 2:
            self._refresh()

    def _take_ticket(self) -> Any:
        def create() -> Any:
            return self.client.create_model_version(
                self.name,
                TICKET_SOURCE,
                tags={TOKEN_TAG: self.token, HOLDER_TAG: self.holder},
                description=self.holder,
                await_creation_for=0,
            )

        doing = f"taking a ticket of lock {self.name!r}"
        try:
            return retry_transient(create, doing)
        except MlflowException as error:
            if error.error_code != NOT_FOUND:
                raise
        self._create_lock_model()
        return retry_transient(create, doing)

    def _create_lock_model(self) -> None:
        def create() -> None:
            try:
                self.client.create_registered_model(
                    self.name,
                    tags={LOCK_TAG: "true"},
                    description=(
                        f"Not a model: peftflow's promotion lock of {self.model_name!r}. Each "
                        "version is one waiting or holding promotion; delete a version only if "
                        "its holder is gone."
                    ),
                )
            except MlflowException as error:
                if error.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise

        retry_transient(create, f"creating lock {self.name!r}")

    def _wait_turn(self, store_now_ms: int) -> None:
        """Poll until no live ticket is ahead; evict dead ones; refresh ours meanwhile."""
        deadline = time.monotonic() + self.timeout_s
        pause = FIRST_POLL_S
        while True:
            blocking = self._ahead(store_now_ms)
            if not blocking:
                return
            if time.monotonic() >= deadline:
                raise self._timeout(blocking[0], store_now_ms)
            time.sleep(pause * (0.5 + random.random()))
            pause = min(pause * 2, MAX_POLL_S)
            store_now_ms = self._refresh()

    def _ahead(self, store_now_ms: int) -> list[Any]:
        """Live tickets before ours, after deleting dead ones and our own duplicates.

        A duplicate is a ticket a retried create made after the store committed the first
        attempt and still reported an error; it carries our token.
        """
        mine = self.ticket
        tickets = retry_transient(
            lambda: self.client.search_model_versions(f"name = '{self.name}'"),
            f"reading lock {self.name!r}",
        )
        blocking = []
        for ticket in sorted(tickets, key=lambda t: int(t.version)):
            number = int(ticket.version)
            ours = ticket.tags.get(TOKEN_TAG) == self.token and number != mine
            dead = ticket.last_updated_timestamp < store_now_ms - self.ttl_s * 1000
            if ours or (number < mine and dead):
                self._delete(number)
            elif number < mine:
                blocking.append(ticket)
        return blocking

    def _refresh(self) -> int:
        """Stamp the store's clock on our ticket; the store's time now, in ms."""
        sent = time.monotonic()
        try:
            refreshed = retry_transient(
                lambda: self.client.update_model_version(
                    self.name, str(self.ticket), description=self.holder
                ),
                f"refreshing ticket v{self.ticket} of lock {self.name!r}",
            )
        except MlflowException as error:
            if error.error_code != NOT_FOUND:
                raise
            self.ticket = None
            raise RegistryError(
                f"ticket of lock {self.name!r} was deleted while it was in use (its holder "
                f"went silent for over {self.ttl_s:.0f} s, or someone deleted it by hand); "
                "nothing more was written. Run the command again."
            ) from None
        self._refreshed_at = sent
        return refreshed.last_updated_timestamp

    def _delete(self, number: int) -> None:
        def delete() -> None:
            try:
                self.client.delete_model_version(self.name, str(number))
            except MlflowException as error:
                if error.error_code != NOT_FOUND:  # already deleted: what we wanted
                    raise

        retry_transient(delete, f"deleting ticket v{number} of lock {self.name!r}")

    def _timeout(self, blocking: Any, store_now_ms: int) -> LockTimeout:
        silent_s = max(0.0, (store_now_ms - blocking.last_updated_timestamp) / 1000)
        holder = blocking.tags.get(HOLDER_TAG, "an unknown holder")
        return LockTimeout(
            f"waited {self.timeout_s:.0f} s for the promotion lock of model "
            f"{self.model_name!r}; it is still held by ticket v{blocking.version} of "
            f"registered model {self.name!r} ({holder}), last refreshed {silent_s:.0f} s ago. "
            f"A holder silent for {self.ttl_s:.0f} s is taken over automatically, so this one "
            "is alive: retry when it has finished. If you know its process is gone, delete the "
            f"ticket: MlflowClient({self.client.tracking_uri!r}).delete_model_version("
            f"{self.name!r}, '{blocking.version}')."
        )
