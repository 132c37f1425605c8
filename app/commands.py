"""Server commands of the `squish` CLI: serve, api, worker, db, keys.

Imported by `squish.cli` when the server is installed; heavy imports stay inside commands.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

import click


def _bootstrap(print_key: bool) -> None:
    """Migrate, then make sure some API key works; print a new one once."""
    from app.db import session_scope
    from app.keys import DEFAULT_TENANT, create_key, has_any_key, register_key
    from app.migrate import upgrade
    from app.settings import get_settings

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade()
    with session_scope() as session:
        if settings.api_key is not None:
            register_key(session, settings.api_key.get_secret_value(), DEFAULT_TENANT)
            return
        if has_any_key(session):
            if print_key:
                click.echo(
                    "API key: the one printed on first start (saved in "
                    f"{settings.data_dir / 'api-key'}), or `squish keys create --tenant NAME`."
                )
            return
        key = create_key(session, DEFAULT_TENANT)
    key_file = settings.data_dir / "api-key"
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    click.echo(
        f"Created an API key for tenant '{DEFAULT_TENANT}' (shown once, also saved in {key_file}):"
    )
    click.echo(f"  {key}")


def worker_argv(queues: str, concurrency: int, name: str | None = None) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.tasks",
        "worker",
        "--queues",
        queues,
        "--concurrency",
        str(concurrency),
        "--pool",
        "prefork",
        "--loglevel",
        "INFO",
        "--without-gossip",
        "--without-mingle",
    ]
    if name:
        argv += ["--hostname", name]
    from app.settings import get_settings

    if get_settings().log_format == "json":
        argv.insert(argv.index("worker"), "--quiet")  # no banner among the JSON lines
    return argv


def _uvicorn(host: str, port: int, workers: int = 1, log_level: str = "info") -> None:
    import uvicorn

    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
        proxy_headers=True,
    )


@click.command()
@click.option("--host", default=None, help="Bind address (default SQUISH_HOST).")
@click.option("--port", type=int, default=None, help="Port (default SQUISH_PORT).")
def serve(host: str | None, port: int | None) -> None:
    """Run squish on this machine: migrations, the API and a Celery worker, embedded defaults."""
    from app.settings import get_settings

    settings = get_settings()
    _bootstrap(print_key=True)
    env = dict(os.environ, SQUISH_DATA_DIR=str(settings.data_dir))
    worker = subprocess.Popen(
        worker_argv(settings.worker_queues, settings.worker_concurrency, "squish-embedded@%h"),
        env=env,
    )
    host, port = host or settings.host, port or settings.port
    click.echo(
        f"squish is up: http://{host}:{port}  (API docs at /docs; Ctrl-C stops API and worker)"
    )
    click.echo(
        f"data: {settings.data_dir}  database: {settings.database_url.split('://')[0]}  "
        f"broker: {settings.broker_url.split('://')[0]}  storage: {settings.storage_url.split('://')[0]}"
    )
    try:
        _uvicorn(host, port)
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=15)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()


@click.command()
@click.option("--host", default=None, help="Bind address (default SQUISH_HOST).")
@click.option("--port", type=int, default=None, help="Port (default SQUISH_PORT).")
@click.option("--workers", type=int, default=1, show_default=True, help="API processes.")
@click.option("--migrate/--no-migrate", default=False, help="Apply migrations first.")
def api(host: str | None, port: int | None, workers: int, migrate: bool) -> None:
    """Run the HTTP API only (production: workers run separately)."""
    from app.settings import get_settings

    settings = get_settings()
    if migrate:
        _bootstrap(print_key=False)
    _uvicorn(host or settings.host, port or settings.port, workers)


@click.command()
@click.option("--queues", default="cpu", show_default=True, help="Comma-separated: cpu, gpu.")
@click.option("--concurrency", type=int, default=1, show_default=True, help="Jobs at once.")
@click.option("--name", default=None, help="Celery node name (default celery@host).")
def worker(queues: str, concurrency: int, name: str | None) -> None:
    """Run a Celery worker that executes compression jobs from the given queues."""
    bad = set(queues.split(",")) - {"cpu", "gpu"}
    if bad:
        raise click.BadParameter(
            f"unknown queue(s) {sorted(bad)}; use cpu and/or gpu", param_hint="--queues"
        )
    os.execv(sys.executable, worker_argv(queues, concurrency, name))


@click.group()
def db() -> None:
    """Database migrations."""


@db.command("upgrade")
@click.argument("revision", default="head")
def db_upgrade(revision: str) -> None:
    """Apply migrations up to REVISION (default head)."""
    from app.migrate import upgrade

    upgrade(revision=revision)
    click.echo(f"database upgraded to {revision}")


@db.command("downgrade")
@click.argument("revision")
def db_downgrade(revision: str) -> None:
    """Revert migrations down to REVISION ('base' empties the schema)."""
    from app.migrate import downgrade

    downgrade(revision=revision)
    click.echo(f"database downgraded to {revision}")


@click.group()
def keys() -> None:
    """API keys and tenants."""


@keys.command("create")
@click.option("--tenant", required=True, help="Tenant name; created if new.")
def keys_create(tenant: str) -> None:
    """Print a new API key for TENANT (it is not stored in clear anywhere)."""
    from app.db import session_scope
    from app.keys import create_key
    from app.migrate import upgrade

    upgrade()
    with session_scope() as session:
        key = create_key(session, tenant)
    click.echo(key)


def register(group: Any) -> None:
    for command in (serve, api, worker, db, keys):
        group.add_command(command)
