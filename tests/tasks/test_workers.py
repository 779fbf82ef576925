"""Waiting on the flow runs a study sent to a work pool (tasks/workers.py)."""

from __future__ import annotations

import logging
import threading
import time

from tasks import workers


def test_a_run_no_worker_starts_is_named_once_with_its_pool_and_its_end_still_awaited(
    prefect_server, monkeypatch, caplog
):
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.states import Cancelled

    logger = logging.getLogger("peftflow.test.workers")
    monkeypatch.setattr(workers, "get_run_logger", lambda: logger)  # outside a flow run
    monkeypatch.setattr(workers, "POLL_SECONDS", 0.2)
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="nobody-polls", type="process"))
        flow_id = client.create_flow_from_name("lonely")
        client.create_deployment(
            flow_id, "lonely", work_pool_name="nobody-polls", entrypoint="flows/lonely.py:lonely"
        )
    runs = workers.submit("lonely/lonely", {"variant-a": {}})

    def cancel_after_the_warning() -> None:
        time.sleep(3)
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(runs["variant-a"], Cancelled(), force=True)

    canceller = threading.Thread(target=cancel_after_the_warning)
    canceller.start()
    with caplog.at_level(logging.WARNING, logger.name):
        states = workers.wait_until_final(runs, warn_after=1)
    canceller.join()

    assert states["variant-a"].is_cancelled()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings  # once, though the run waited several polls more
    assert "variant-a: still " in warnings[0] and "no worker has started it" in warnings[0]
    assert "`make worker POOL=nobody-polls`" in warnings[0]
