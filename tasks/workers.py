"""Variants on workers: flow runs of a deployment, submitted by a study and waited for.

Prefect does the dispatch (``run_deployment`` puts a flow run on the deployment's work
pool; any worker polling that pool takes it) and notices a lost worker (the flow run
stops sending heartbeats; the automation below marks it Crashed). What is left here is
waiting for several flow runs at once: ``run_deployment`` waits for one.
"""

from __future__ import annotations

import time
from datetime import timedelta
from uuid import UUID

from prefect import get_client, get_run_logger
from prefect.automations import Automation
from prefect.client.schemas.objects import StateType
from prefect.deployments import run_deployment
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.states import State

# A flow run sends a heartbeat every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds (Prefect's
# default 180, at least 30); one missing for this long means its process is gone.
CRASH_AUTOMATION = "peftflow: crash flow runs without heartbeats"
FINAL_EVENTS = {
    f"prefect.flow-run.{state}" for state in ("Completed", "Failed", "Cancelled", "Crashed")
}
POLL_SECONDS = 2.0
# A flow run still Scheduled (or Late, or Pending) after this long: no worker is taking its
# pool's runs. Said once per run in the study's log; the study keeps waiting (workers may start).
WAITING_WARN_SECONDS = 300.0


def detect_lost_flow_runs(heartbeat_seconds: int) -> None:
    """Create (once per server) the automation that marks a silent flow run Crashed.

    It is Prefect's documented answer to a worker that dies with its flow runs (power,
    OOM killer, a node gone): nothing else would ever end their Running state.
    """
    try:
        Automation.read(name=CRASH_AUTOMATION)
        return
    except ValueError:
        pass
    Automation(
        name=CRASH_AUTOMATION,
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *FINAL_EVENTS},
            match={"prefect.resource.id": ["prefect.flow-run.*"]},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=2 * heartbeat_seconds + 15),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message="its worker stopped sending heartbeats (killed, or lost)",
            )
        ],
    ).create()


def require_deployment(name: str) -> None:
    """Refuse an unknown ``flow/deployment`` before the study ingests or trains anything."""
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(name)
        except ObjectNotFound:
            known = _deployment_names(client)
            raise ValueError(
                f"no deployment {name!r} on the Prefect server; deployed: "
                f"{', '.join(known) or 'none'} (run `prefect deploy --all`, or name one of these)"
            ) from None


def _deployment_names(client) -> list[str]:
    """``flow/deployment`` of every deployment (a deployment holds only its flow's id)."""
    flows = {flow.id: flow.name for flow in client.read_flows()}
    return sorted(f"{flows.get(d.flow_id, '?')}/{d.name}" for d in client.read_deployments())


def submit(deployment: str, runs: dict[str, dict]) -> dict[str, UUID]:
    """One flow run of ``deployment`` per ``{idempotency key: parameters}``; their ids.

    The key makes a resubmission (the study flow retried) find the flow run it made
    before instead of training the variant twice.
    """
    return {
        key: run_deployment(deployment, parameters=params, timeout=0, idempotency_key=key).id
        for key, params in runs.items()
    }


def wait_until_final(
    flow_run_ids: dict[str, UUID], warn_after: float = WAITING_WARN_SECONDS
) -> dict[str, State]:
    """Each flow run's final state (Completed, Failed, Crashed or Cancelled).

    A run that no worker has started after ``warn_after`` seconds is named in a warning,
    once, with its work pool: the usual cause is that no worker polls that pool.
    """
    final: dict[str, State] = {}
    warned: set[str] = set()
    logger = get_run_logger()
    started = time.monotonic()
    with get_client(sync_client=True) as client:
        while len(final) < len(flow_run_ids):
            waited = time.monotonic() - started
            for key, run_id in flow_run_ids.items():
                if key in final:
                    continue
                run = client.read_flow_run(run_id)
                if run.state is not None and run.state.is_final():
                    logger.info("%s: %s", key, run.state.name)
                    final[key] = run.state
                elif key not in warned and not_started(run, waited, warn_after):
                    warned.add(key)
                    logger.warning(waiting_message(key, run, waited))
            if len(final) < len(flow_run_ids):
                time.sleep(POLL_SECONDS)
    return {key: final[key] for key in flow_run_ids}


def not_started(run, waited: float, warn_after: float) -> bool:
    """Whether ``run`` has waited ``warn_after`` seconds or more without a worker starting it."""
    waiting = run.state is None or run.state.type in (StateType.SCHEDULED, StateType.PENDING)
    return waiting and waited >= warn_after


def waiting_message(key: str, run, waited: float) -> str:
    pool = run.work_pool_name or "its work pool"
    state = run.state.name if run.state else "no state"
    return (
        f"{key}: still {state} after {waited:.0f} s, no worker has started it; is a worker "
        f"polling {pool}? (`make worker POOL={pool}` on a machine that should train it)"
    )
