"""The Celery app and the only messages squish sends: "run job X", "inspect model Y",
"deliver the webhook of job X", and a search's "step", "run trial T" and "finish".

Messages carry ids only; the database holds the state, so a lost message is re-sent by the
reaper and a duplicate one is harmless. Torch-free: the API imports this.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

from celery import Celery
from sqlalchemy import event
from sqlalchemy.orm import Session

from app.settings import Settings, get_settings
from worker.contract import Device, values

log = logging.getLogger("squish.queue")

RUN_JOB = "squish.run_job"
INSPECT_MODEL = "squish.inspect_model"
DELIVER_WEBHOOK = "squish.deliver_webhook"
# Log a succeeded job where its `export` says (app/jobs/exports.py, worker/export.py).
EXPORT_JOB = "squish.export_job"
# A search job (worker/search_tasks.py): ask for trials, run one trial, finish the search.
SEARCH_STEP = "squish.search_step"
RUN_TRIAL = "squish.run_trial"
FINISH_SEARCH = "squish.finish_search"
QUEUES = values(Device)  # target.device is the queue


def broker_options(settings: Settings) -> dict[str, Any]:
    if settings.embedded_broker:
        folder = settings.broker_dir / "queue"
        folder.mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(folder),
            "data_folder_out": str(folder),
            "control_folder": str(settings.broker_dir / "control"),
            "store_processed": False,
            "polling_interval": settings.broker_poll_interval_s,
        }
    return {"visibility_timeout": 3600}


def make_celery(settings: Settings) -> Celery:
    app = Celery("squish", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        broker_transport_options=broker_options(settings),
        broker_connection_retry_on_startup=True,
        task_default_queue=Device.cpu.value,
        task_acks_late=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        result_backend=None,
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        # The folder broker has no broadcast channel for remote control.
        worker_enable_remote_control=not settings.embedded_broker,
        broker_heartbeat=0,
    )
    return app


@lru_cache
def get_celery() -> Celery:
    return make_celery(get_settings())


def send(task: str, obj_id: str, queue: str, *, countdown: float | None = None) -> bool:
    """Send one message (run no sooner than `countdown` seconds from now, if given).

    False when the broker is unreachable: the row is committed, the reaper re-sends later.
    """
    try:
        get_celery().send_task(
            task,
            args=[obj_id],
            queue=queue,
            countdown=countdown,
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.2},
        )
        return True
    except Exception:  # broker down
        log.warning("could not send %s(%s) to queue %s", task, obj_id, queue, exc_info=True)
        return False


def send_after_commit(
    session: Session, task: str, obj_id: str, queue: str, *, countdown: float | None = None
) -> None:
    """Send only once the row that the message names is committed (never before)."""

    def _send(_session: Session) -> None:
        send(task, obj_id, queue, countdown=countdown)

    event.listen(session, "after_commit", _send, once=True)


def check_broker(settings: Settings) -> None:
    """Readiness: raise if the broker cannot be reached."""
    if settings.embedded_broker:
        folder = settings.broker_dir / "queue"
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".ready"
        probe.write_bytes(b"ok")
        probe.unlink()
        return
    with get_celery().connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=2)
