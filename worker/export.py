"""Export of a succeeded job's result to MLflow: the artifacts, the metrics, the recipe.

``export.mlflow`` in a job's spec (:class:`Export`, checked by the API at submission and by
``squish compress --local``) names a tracking server; after the job succeeds the worker
calls :func:`export_to_mlflow`, which logs into one MLflow run the job's files (the model,
the report, the card when there is one), every measured figure flattened to a dotted name
(``compressed.size_bytes``, ``steps.0.latency_ms.batch_1.p50``, ...: :func:`flat_metrics`),
the recipe as params (``pipeline.0.method``, ``pipeline.0.params.amount``, ...), and, when
``registered_model`` is given, registers the model file as a new version of that model.

An export never fails the compression: a tracking server that is down or refuses the
run raises :class:`ExportFailed`, which the worker records as a warning event. The
MLflow client is imported only here, when an export runs (``mlflow-skinny`` is enough).
Torch-free.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_URI_LENGTH = 2000
TRACKING_SCHEMES = ("http", "https", "file")

# The MLflow client retries a failed request 7 times with a growing backoff and waits
# 120 s for an answer; an export should give up sooner. The operator's MLFLOW_* wins.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}

_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")
_MAX_KEY = 250
_MAX_PARAM_VALUE = 6000
_BATCH = 100  # params/tags per log_batch call (MLflow's limit); metrics go 1000 at a time


def check_tracking_uri(value: str) -> str:
    """An http(s) URL with a host, or a ``file:`` URI of an absolute path; else ValueError."""
    if len(value) > MAX_URI_LENGTH:
        raise ValueError(f"at most {MAX_URI_LENGTH} characters")
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise ValueError("no spaces or control characters in the URI")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018  (raises ValueError for a port that is not a number)
    except ValueError as exc:
        raise ValueError(f"not a URI: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in TRACKING_SCHEMES:
        raise ValueError(
            "the tracking URI must be an http(s) URL of an MLflow tracking server, e.g. "
            "'http://mlflow.internal:5000', or a file: URI, e.g. 'file:///srv/mlruns'"
            + (f"; {scheme!r} is not supported" if scheme else "")
        )
    if scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ValueError("a file: URI names an absolute path: 'file:///srv/mlruns'")
        return value
    if not parts.hostname:
        raise ValueError(f"the {scheme} URL has no host: write '{scheme}://HOST[:PORT]'")
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            "put no credentials in the URI (the spec is shown to every reader of the job): "
            "the worker reads them from its MLFLOW_TRACKING_TOKEN or "
            "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD environment"
        )
    return value


def tracking_uri_refusal(uri: str, allowed: Sequence[str], allow_any: bool) -> str | None:
    """Why the operator's list does not let a job log to ``uri``; None: it may.

    ``allowed`` holds the tracking URIs the operator names (``SQUISH_MLFLOW_TRACKING_URIS``);
    ``uri`` matches one with the same scheme, host and port and a path at or under its
    path. The worker sends its own MLflow credentials to the server, and a ``file:`` store
    writes on the worker, so a tenant may not pick any address: ``allow_any`` (embedded mode,
    an empty list) is the one exception.
    """
    if allow_any and not allowed:
        return None
    target = urlsplit(uri)
    for entry in allowed:
        bound = urlsplit(entry)
        same_server = (
            target.scheme.lower() == bound.scheme.lower()
            and (target.hostname or "") == (bound.hostname or "")
            and _port(target) == _port(bound)
        )
        base = bound.path.rstrip("/")
        if same_server and (target.path.rstrip("/") == base or target.path.startswith(base + "/")):
            return None
    listed = ", ".join(allowed) if allowed else "none"
    return (
        f"this service does not log to {uri!r}: the operator allows these tracking URIs: "
        f"{listed} (SQUISH_MLFLOW_TRACKING_URIS)"
    )


def _port(parts: SplitResult) -> int | None:
    return parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())


class MlflowExport(BaseModel):
    """Log the result into an MLflow run on this tracking server.

    Example:
        ``{"tracking_uri": "http://mlflow:5000", "experiment": "resnet", "registered_model": "resnet-int8"}``
    """

    model_config = ConfigDict(extra="forbid")

    tracking_uri: str = Field(
        description="The tracking server, `http(s)://HOST[:PORT]`, or a `file:///PATH` store."
    )
    experiment: str = Field(
        "squish",
        min_length=1,
        max_length=200,
        description="The experiment the run goes in (created when missing).",
    )
    registered_model: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="Register the compressed model as a new version of this registered model.",
    )

    _uri = field_validator("tracking_uri")(check_tracking_uri)

    @field_validator("experiment", "registered_model")
    @classmethod
    def _printable(cls, value: str | None) -> str | None:
        if value is not None and not value.isprintable():
            raise ValueError("printable characters only")
        return value


class Export(BaseModel):
    """Where a succeeded job's result is logged."""

    model_config = ConfigDict(extra="forbid")

    mlflow: MlflowExport | None = Field(None, description="An MLflow tracking server.")


class ExportFailed(Exception):
    """The export did not go through; the message says why (the job is not affected)."""


@dataclass(frozen=True)
class ExportResult:
    """Where the result went: the run, and the model version when one was registered."""

    run_id: str
    experiment_id: str
    artifact_uri: str
    model_version: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "experiment_id": self.experiment_id,
            "artifact_uri": self.artifact_uri,
            "model_version": self.model_version,
        }


def _key(text: str) -> str:
    return _KEY_CHARS.sub("_", text)[:_MAX_KEY]


def flat_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Every number in ``metrics`` under its dotted path (lists by index); no booleans."""
    flat: dict[str, float] = {}
    for name, value in metrics.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping):
            flat.update(flat_metrics(value, f"{key}."))
        elif isinstance(value, list):
            flat.update(flat_metrics({str(i): v for i, v in enumerate(value)}, f"{key}."))
        elif (
            isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        ):
            flat[_key(key)] = float(value)
    return flat


def flat_params(spec: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """The recipe as MLflow params: every leaf of the spec as text, under its dotted path."""
    flat: dict[str, str] = {}
    for name, value in spec.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping) and value:
            flat.update(flat_params(value, f"{key}."))
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            flat.update(flat_params({str(i): v for i, v in enumerate(value)}, f"{key}."))
        elif value is not None:
            text = value if isinstance(value, str) else _json(value)
            flat[_key(key)] = text[:_MAX_PARAM_VALUE]
    return flat


def _json(value: Any) -> str:
    import json

    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def export_to_mlflow(
    config: MlflowExport,
    *,
    job_id: str,
    files: Mapping[str, Path],
    metrics: Mapping[str, Any],
    recipe: Mapping[str, Any],
    tags: Mapping[str, str] | None = None,
) -> ExportResult:
    """Log one run: ``files`` (by artifact name), ``metrics`` flattened, ``recipe`` as params.

    Raises:
        ExportFailed: the tracking server could not be reached or refused something.
    """
    for name, default in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, default)
    try:
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.tracking import MlflowClient
    except ImportError as exc:
        raise ExportFailed(
            f"the MLflow client is not installed on this worker ({exc}); "
            "install it with: pip install mlflow-skinny"
        ) from exc
    try:
        client = MlflowClient(tracking_uri=config.tracking_uri, registry_uri=config.tracking_uri)
        experiment = client.get_experiment_by_name(config.experiment)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else client.create_experiment(config.experiment)
        )
        run_tags = {"squish.job_id": job_id, **(tags or {})}
        run = client.create_run(experiment_id, tags=run_tags, run_name=job_id)
        run_id = run.info.run_id
        try:
            now = int(time.time() * 1000)
            params = [Param(k, v) for k, v in flat_params(recipe).items()]
            for chunk in _chunks(params, _BATCH):
                client.log_batch(run_id, params=chunk)
            figures = [Metric(k, v, now, 0) for k, v in flat_metrics(metrics).items()]
            for chunk in _chunks(figures, 1000):
                client.log_batch(run_id, metrics=chunk)
            for name, path in files.items():
                client.log_artifact(run_id, str(path), artifact_path=name)
            version = None
            if config.registered_model:
                version = _register(client, config.registered_model, run, files)
            client.log_batch(run_id, tags=[RunTag("squish.status", "succeeded")])
        except BaseException:
            client.set_terminated(run_id, "FAILED")
            raise
        client.set_terminated(run_id, "FINISHED")
    except ExportFailed:
        raise
    except Exception as exc:
        raise ExportFailed(_reason(exc, config.tracking_uri)) from exc
    return ExportResult(run_id, experiment_id, run.info.artifact_uri, version)


def _register(client: Any, name: str, run: Any, files: Mapping[str, Path]) -> str:
    """A new version of registered model ``name`` whose source is the run's model file."""
    from mlflow.exceptions import MlflowException

    if "model" not in files:
        raise ExportFailed("there is no model artifact to register")
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{run.info.artifact_uri}/model/{files['model'].name}"
    version = client.create_model_version(name, source=source, run_id=run.info.run_id)
    return str(version.version)


def _reason(exc: Exception, uri: str) -> str:
    text = " ".join(str(exc).split())
    if len(text) > 500:
        text = text[:500] + "…"
    return f"MLflow at {uri}: {type(exc).__name__}: {text}"
