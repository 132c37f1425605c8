"""The ``squish`` command line.

``squish compress`` uploads a model, runs a compression job, shows its progress and
downloads the result; ``squish optimize`` runs a search instead (a live table of its trials,
the best model downloaded, exit 1 naming the unmet constraints when no trial meets them); ``squish models|datasets|jobs|artifacts|methods|webhook-secret``
manage the server's resources (tables for people, ``--json`` for scripts). When the server
package is installed, its commands (``serve``, ``worker``, ``db``, ...) appear too.

Exit codes: 0 success; 1 the job failed or was cancelled, the wait timed out, the
server failed (5xx) or could not be reached; 2 bad usage or a 4xx answer (the
problem's detail and field errors are printed).

While the server answers 503 (its database or object storage is down) or cannot be
reached, requests that are safe to repeat are retried for ``--retry-for`` seconds, and
each wait is said on stderr ("database unavailable, retrying in 2 s…").
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import click

from squish import __version__
from squish.client import DEFAULT_RETRY_FOR_S, DEFAULT_URL, Client, RetryNotice
from squish.errors import ApiError, JobCancelled, JobError, JobFailed, SquishError, WaitTimeout
from worker.contract import (
    FORMATS,
    DatasetFormat,
    DatasetRole,
    JobStatus,
    ModelFormat,
    RuntimeName,
    format_of_suffix,
    values,
)

EXIT_FAILED = 1
EXIT_USAGE = 2

DATASET_ROLES = values(DatasetRole)
MODEL_FORMATS = values(ModelFormat)
DATA_SUFFIXES = tuple(f".{fmt}" for fmt in values(DatasetFormat))
MODEL_SUFFIXES = {facts.suffix: str(fmt) for fmt, facts in FORMATS.items()}
JOB_STATUSES = values(JobStatus)


# -- the group ---------------------------------------------------------------------


class SquishGroup(click.Group):
    """Renders SDK errors once, with the documented exit codes, and adds the server's
    commands the first time a command name is not one of the client's own (so a
    client command never imports the server package)."""

    _server_commands_loaded = False

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except JobError as exc:
            _error(str(exc))
            ctx.exit(EXIT_FAILED)
        except WaitTimeout as exc:
            _error(f"{exc}; follow it with: squish jobs wait {exc.job.get('id', '')}")
            ctx.exit(EXIT_FAILED)
        except ApiError as exc:
            _error(str(exc))
            ctx.exit(EXIT_USAGE if 400 <= exc.status < 500 else EXIT_FAILED)
        except SquishError as exc:  # TransportError, ChecksumMismatch, ...
            _error(str(exc))
            ctx.exit(EXIT_FAILED)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is None and not self._server_commands_loaded:
            self.load_server_commands()
            command = super().get_command(ctx, cmd_name)
        return command

    def list_commands(self, ctx: click.Context) -> list[str]:
        self.load_server_commands()
        return super().list_commands(ctx)

    def load_server_commands(self) -> None:
        if not self._server_commands_loaded:
            self._server_commands_loaded = True
            register_server_commands(self)


def register_server_commands(group: click.Group) -> bool:
    """Add the server's commands (``app.commands.register``) when ``app`` is installed.

    Returns whether they were added. Only the absence of the ``app`` package itself is
    tolerated: an installed server with a broken dependency fails loudly.
    """
    try:
        from app.commands import register
    except ModuleNotFoundError as exc:
        name = exc.name or ""
        if name == "app" or name.startswith("app."):
            return False
        raise
    register(group)
    return True


class _Settings:
    def __init__(
        self, url: str | None, api_key: str | None, retry_for: float = DEFAULT_RETRY_FOR_S
    ) -> None:
        self.url = url
        self.api_key = api_key
        self.retry_for = retry_for
        self.client: Client | None = None


def _client(ctx: click.Context) -> Client:
    root = ctx.find_root()
    settings = root.find_object(_Settings)
    if settings is None:  # a subcommand invoked on its own: Client reads the environment
        settings = root.obj = _Settings(None, None)
    if settings.client is None:
        client = Client(
            settings.url, settings.api_key, retry_for=settings.retry_for, on_retry=_say_retry
        )
        settings.client = root.with_resource(client)
    return settings.client


def _say_retry(notice: RetryNotice) -> None:
    """What the client waits for, on stderr: "database unavailable, retrying in 2 s…"."""
    ProgressBar.interrupt()
    click.echo(str(notice), err=True)


@click.group(cls=SquishGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--url",
    envvar="SQUISH_URL",
    default=DEFAULT_URL,
    show_default=True,
    metavar="URL",
    help="The squish server [env SQUISH_URL].",
)
@click.option(
    "--api-key", envvar="SQUISH_API_KEY", metavar="KEY", help="API key [env SQUISH_API_KEY]."
)
@click.option(
    "--retry-for",
    envvar="SQUISH_RETRY_FOR_S",
    type=click.FloatRange(min=0),
    default=DEFAULT_RETRY_FOR_S,
    show_default=True,
    metavar="SECONDS",
    help="How long to keep retrying a request while the server is unavailable (503) or "
    "unreachable; 0: never [env SQUISH_RETRY_FOR_S].",
)
@click.version_option(__version__, prog_name="squish")
@click.pass_context
def cli(ctx: click.Context, url: str, api_key: str | None, retry_for: float) -> None:
    """squish: compress PyTorch and ONNX models (prune, distill, quantize) as a service."""
    ctx.obj = _Settings(url, api_key, retry_for)


def main() -> None:
    """The ``squish`` console script."""
    cli(prog_name="squish")


# -- output helpers ----------------------------------------------------------------


def _error(message: str) -> None:
    click.echo(f"error: {message}", err=True)


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=False, default=str))


def _fmt_bytes(n: Any) -> str:
    if not isinstance(n, int | float):
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _fmt_time(value: Any) -> str:
    if not value:
        return "-"
    text = str(value).replace("T", " ")
    return text[:19]


def _fmt_progress(value: Any) -> str:
    return f"{value * 100:.0f}%" if isinstance(value, int | float) else "-"


Column = tuple[str, Callable[[Mapping[str, Any]], Any]]


def _table(rows: Iterable[Mapping[str, Any]], columns: Sequence[Column]) -> None:
    cells = [[h for h, _ in columns]]
    for row in rows:
        cells.append(["-" if (v := fn(row)) is None or v == "" else str(v) for _, fn in columns])
    if len(cells) == 1:
        click.echo("(none)")
        return
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    for r in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _fields(names: Sequence[tuple[str, Any]]) -> None:
    width = max(len(label) for label, _ in names)
    for label, value in names:
        if value is None or value == "":
            continue
        click.echo(f"{label.ljust(width)}  {value}")


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(", ", ": "), default=str)


def _limited(items: Iterator[dict[str, Any]], limit: int | None) -> Iterator[dict[str, Any]]:
    return islice(items, limit) if limit is not None else items


def _suffix_format(path: Path) -> str | None:
    fmt = format_of_suffix(path.name)
    return None if fmt is None else str(fmt)


def _looks_like_path(value: str, suffixes: Iterable[str]) -> bool:
    return os.sep in value or "/" in value or value.lower().endswith(tuple(suffixes))


# -- progress ----------------------------------------------------------------------


class ProgressBar:
    """Prints a job's status, percent and stage on stderr: one redrawn line on a
    terminal; otherwise (CI logs) a line when the status or stage changes or the
    percentage has moved by 10 points."""

    width = 30
    _active: ProgressBar | None = None
    """The bar drawn last on a terminal, so that a message can start on a line of its own."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.drawn = False
        self._last: tuple[str, str, int] | None = None

    @classmethod
    def interrupt(cls) -> None:
        """End the bar's line (it is redrawn below at the next change)."""
        bar = cls._active
        if bar is not None:
            bar.close()
            bar._last = None

    def __call__(self, job: Mapping[str, Any]) -> None:
        status = str(job.get("status") or "?")
        progress = job.get("progress")
        fraction = min(max(float(progress), 0.0), 1.0) if isinstance(progress, int | float) else 0.0
        stage = str(job.get("stage") or "")
        percent = round(fraction * 100)
        if self.tty:
            if self._last == (status, stage, percent):
                return
            filled = round(self.width * fraction)
            bar = "#" * filled + "-" * (self.width - filled)
            line = f"{status:<9} [{bar}] {percent:3d}% {stage}"
            click.echo("\r" + line.ljust(79), err=True, nl=False)
            ProgressBar._active = self
        else:
            last = self._last
            if last is not None and last[:2] == (status, stage) and abs(percent - last[2]) < 10:
                return
            click.echo(f"{status} {percent}% {stage}".rstrip(), err=True)
        self._last = (status, stage, percent)
        self.drawn = True

    def close(self) -> None:
        if self.tty and self.drawn:
            click.echo("", err=True)
        self.drawn = False
        if ProgressBar._active is self:
            ProgressBar._active = None


# -- compress ----------------------------------------------------------------------


def scan_pipeline_options(command: click.Command, args: Sequence[str]) -> list[tuple[str, str]]:
    """The ``--method`` and ``--param`` values in command-line order.

    Click groups a repeated option's values per option, losing how ``--param``s
    interleave with ``--method``s; this walks the raw arguments, skipping the values
    of the command's other options, to recover it.
    """
    takes_value: dict[str, str] = {}
    for param in command.params:
        if isinstance(param, click.Option) and not param.is_flag and not param.count:
            for opt in param.opts:
                takes_value[opt] = param.name or ""
    order: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        token = args[i]
        if token == "--":
            break
        name: str | None = None
        value: str | None = None
        if token.startswith("--") and "=" in token:
            opt, _, value = token.partition("=")
            name = takes_value.get(opt)
        elif token in takes_value:
            name = takes_value[token]
            if i + 1 < len(args):
                value = args[i + 1]
            i += 1
        elif token.startswith("-") and not token.startswith("--") and token[:2] in takes_value:
            name, value = takes_value[token[:2]], token[2:]
        if name in ("method", "param") and value is not None:
            order.append((name, value))
        i += 1
    return order


def parse_param(text: str) -> tuple[str, Any]:
    """``"amount=0.5"`` -> ``("amount", 0.5)``; a value that is not JSON stays a string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise click.BadParameter(f"{text!r} is not KEY=VALUE", param_hint="'--param'")
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    return key, value


def build_pipeline(order: Sequence[tuple[str, str]]) -> list[tuple[str, dict[str, Any]]]:
    """Attach each ``--param`` to the ``--method`` before it."""
    steps: list[tuple[str, dict[str, Any]]] = []
    for kind, value in order:
        if kind == "method":
            steps.append((value, {}))
            continue
        if not steps:
            raise click.UsageError(
                f"--param {value} comes before any --method; put it after its method"
            )
        key, parsed = parse_param(value)
        steps[-1][1][key] = parsed
    if not steps:
        raise click.UsageError("give at least one --method (see: squish methods)")
    return steps


def parse_dataset_option(text: str) -> tuple[str, str]:
    role, sep, value = text.partition("=")
    if not sep or not value:
        raise click.BadParameter(
            f"{text!r} is not ROLE=PATH or ROLE=DATASET_ID", param_hint="'--dataset'"
        )
    if role not in DATASET_ROLES:
        raise click.BadParameter(
            f"unknown role {role!r}; use one of {', '.join(DATASET_ROLES)}",
            param_hint="'--dataset'",
        )
    return role, value


def detect_format(path: Path, explicit: str | None) -> str:
    """The model format: ``--format`` when given, else from the suffix (``.pt2``, ``.onnx``)."""
    if explicit:
        return explicit
    fmt = format_of_suffix(path.name)
    if fmt is None:
        raise click.UsageError(
            f"cannot tell the format of {path.name}: name it .pt2 or .onnx, or pass --format"
        )
    return str(fmt)


# -- constraints (shared by compress and optimize) ---------------------------------


def _per_batch_bound(text: str, flag: str, first_batch: int = 1) -> tuple[str, float]:
    """``"0.5"`` (the first batch size) or ``"32=2.0"`` → ``("batch_32", 2.0)``."""
    batch, sep, bound = text.partition("=")
    if not sep:
        batch, bound = str(first_batch), text
    batch = batch.removeprefix("batch_")
    try:
        size, value = int(batch), float(bound)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not VALUE or BATCH=VALUE", param_hint=flag) from None
    if size < 1 or not value > 0:
        raise click.BadParameter(
            f"{text!r}: the batch size and the bound must be > 0", param_hint=flag
        )
    return f"batch_{size}", value


def constraint_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The constraint flags (DESIGN §12 names): ``--max-accuracy-drop`` (points),
    ``--min-cosine``, ``--max-latency-ms``, ``--max-size-bytes``, ``--min-speedup``."""
    options = [
        click.option(
            "--max-accuracy-drop",
            type=click.FloatRange(min=0, max=100),
            metavar="POINTS",
            help="Largest allowed top-1 accuracy drop in percentage points (1 = one point).",
        ),
        click.option(
            "--min-cosine",
            type=click.FloatRange(min=-1, max=1),
            help="Smallest allowed cosine similarity of the outputs to the original's.",
        ),
        click.option(
            "--max-latency-ms",
            multiple=True,
            metavar="[BATCH=]MS",
            help="Largest allowed p50 latency (batch 1 unless BATCH= is given); repeatable.",
        ),
        click.option(
            "--max-size-bytes", type=click.IntRange(min=1), help="Largest allowed artifact size."
        ),
        click.option(
            "--min-speedup",
            multiple=True,
            metavar="[BATCH=]X",
            help="Smallest allowed speedup over the original (batch 1 unless BATCH=); repeatable.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def constraints_from_options(
    max_accuracy_drop: float | None,
    min_cosine: float | None,
    max_latency_ms: Sequence[str],
    max_size_bytes: int | None,
    min_speedup: Sequence[str],
    *,
    first_batch: int = 1,
) -> dict[str, Any]:
    """The spec's ``constraints`` from the flags of :func:`constraint_options`; a per-batch
    bound without ``BATCH=`` is for ``first_batch`` (the first batch size measured)."""
    constraints: dict[str, Any] = {}
    if max_accuracy_drop is not None:
        constraints["accuracy_drop"] = round(max_accuracy_drop / 100, 10)
    if min_cosine is not None:
        constraints["cosine_similarity"] = min_cosine
    if max_latency_ms:
        constraints["latency_ms"] = dict(
            _per_batch_bound(t, "'--max-latency-ms'", first_batch) for t in max_latency_ms
        )
    if max_size_bytes is not None:
        constraints["size_bytes"] = max_size_bytes
    if min_speedup:
        constraints["speedup"] = dict(
            _per_batch_bound(t, "'--min-speedup'", first_batch) for t in min_speedup
        )
    return constraints


class _CompressCommand(click.Command):
    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["squish.pipeline_order"] = scan_pipeline_options(self, args)
        return super().parse_args(ctx, args)


@cli.command(cls=_CompressCommand)
@click.argument("model", metavar="MODEL")
@click.option(
    "-m",
    "--method",
    "method",
    multiple=True,
    metavar="METHOD",
    help="A pipeline step, e.g. prune.magnitude; repeat for more steps, in order.",
)
@click.option(
    "-p",
    "--param",
    "param",
    multiple=True,
    metavar="KEY=VALUE",
    help="A parameter of the preceding --method; VALUE is parsed as JSON when it can be.",
)
@click.option(
    "-d",
    "--dataset",
    "dataset",
    multiple=True,
    metavar="ROLE=PATH|ID",
    help="calibration/train/eval data: a file to upload, or an uploaded dataset's id.",
)
@click.option(
    "--format",
    "model_format",
    type=click.Choice(MODEL_FORMATS),
    help="Input model format (default: from the file suffix).",
)
@click.option(
    "--output-format",
    type=click.Choice(MODEL_FORMATS),
    help="Output format (default: the input's).",
)
@click.option(
    "--device",
    type=click.Choice(["cpu", "gpu"]),
    default="cpu",
    show_default=True,
    help="Where the job runs and is measured.",
)
@click.option(
    "--runtime", type=click.Choice(values(RuntimeName)), help="Runtime to measure latency in."
)
@click.option(
    "-b",
    "--batch-size",
    "batch_sizes",
    type=click.IntRange(min=1),
    multiple=True,
    help="Batch size to measure latency at; repeatable (default: 1).",
)
@click.option("--warmup", type=click.IntRange(min=0), help="Warm-up runs before timing.")
@click.option("--iterations", type=click.IntRange(min=1), help="Timed runs per batch size.")
@click.option("--name", help="Name of the uploaded model.")
@click.option("--webhook-url", metavar="URL", help="POSTed to when the job finishes.")
@click.option(
    "-o",
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Where to write the compressed model.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    help="Stop waiting after this many seconds (the job goes on).",
)
@click.option(
    "--poll-interval",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="Seconds between status polls.",
)
@click.option(
    "--local",
    is_flag=True,
    help="Run the engine in this process; needs no server (pip install 'squish[engine]').",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print the finished job as JSON instead of a summary."
)
@constraint_options
@click.option(
    "--mlflow",
    "mlflow_uri",
    metavar="URI",
    help="Log the result into an MLflow run on this tracking server (http(s):// or file:///).",
)
@click.option(
    "--mlflow-experiment",
    metavar="NAME",
    help="The MLflow experiment (default: squish); needs --mlflow.",
)
@click.option(
    "--mlflow-register",
    metavar="NAME",
    help="Register the model as a new version of this MLflow registered model; needs --mlflow.",
)
@click.option(
    "--no-cache",
    is_flag=True,
    help="Run even when an earlier job of the same model, data and spec could answer.",
)
@click.pass_context
def compress(
    ctx: click.Context,
    model: str,
    method: tuple[str, ...],
    param: tuple[str, ...],
    dataset: tuple[str, ...],
    model_format: str | None,
    output_format: str | None,
    device: str,
    runtime: str | None,
    batch_sizes: tuple[int, ...],
    warmup: int | None,
    iterations: int | None,
    name: str | None,
    webhook_url: str | None,
    out: Path,
    timeout: float | None,
    poll_interval: float,
    local: bool,
    as_json: bool,
    max_accuracy_drop: float | None,
    min_cosine: float | None,
    max_latency_ms: tuple[str, ...],
    max_size_bytes: int | None,
    min_speedup: tuple[str, ...],
    mlflow_uri: str | None,
    mlflow_experiment: str | None,
    mlflow_register: str | None,
    no_cache: bool,
) -> None:
    """Compress MODEL (a .pt2/.onnx file, or an uploaded model's id) and write --out.

    With constraint flags the command is a CI gate: a result that violates one exits 1,
    naming each violated constraint with the measured value (the model is still written
    to --out). A bound per batch size takes BATCH=VALUE; without BATCH= it is the first
    (smallest) batch size measured.

    \b
    Example:
      squish compress resnet.pt2 \\
        --method prune.magnitude --param amount=0.5 --param scope=global \\
        --method quantize.dynamic --param dtype=int8 \\
        --dataset eval=val.npz --batch-size 1 --batch-size 32 --out resnet.small.pt2
    """
    order = ctx.meta.get("squish.pipeline_order") or [("method", m) for m in method]
    if len([o for o in order if o[0] == "method"]) != len(method) or len(
        [o for o in order if o[0] == "param"]
    ) != len(param):
        raise click.UsageError("could not tell which --param belongs to which --method")
    steps = build_pipeline(order)
    datasets = dict(parse_dataset_option(d) for d in dataset)
    # Only what was given: the server (or the engine) has the defaults.
    evaluate: dict[str, Any] = {}
    if batch_sizes:
        evaluate["batch_sizes"] = list(batch_sizes)
    if warmup is not None:
        evaluate["warmup"] = warmup
    if iterations is not None:
        evaluate["iterations"] = iterations
    constraints = constraints_from_options(
        max_accuracy_drop, min_cosine, max_latency_ms, max_size_bytes, min_speedup,
        first_batch=min(batch_sizes, default=1),
    )  # fmt: skip
    export = mlflow_export_option(mlflow_uri, mlflow_experiment, mlflow_register)

    if local:
        _compress_local(
            Path(model),
            model_format,
            steps,
            datasets,
            output_format,
            device,
            evaluate,
            out,
            as_json,
            constraints=constraints,
            export=export,
        )
        return

    client = _client(ctx)
    model_id = _model_id_or_upload(client, model, name=name, model_format=model_format)
    dataset_ids = {
        role: _dataset_id_or_upload(client, role, value) for role, value in datasets.items()
    }
    job = client.create_job(
        model_id,
        steps,
        datasets=dataset_ids or None,
        target={"device": device, "runtime": runtime},
        output_format=output_format,
        evaluate=evaluate or None,
        webhook_url=webhook_url,
        constraints=constraints or None,
        export=export,
        cache=not no_cache,
    )
    job_id = job["id"]
    click.echo(f"job {job_id} {job.get('status', 'queued')}", err=True)
    job = _wait_with_progress(client, job_id, timeout=timeout, poll_interval=poll_interval)
    if job.get("cached_from"):
        click.echo(f"served from cache: the result of job {job['cached_from']}", err=True)
    unmet = (job.get("error") or {}).get("code") == "constraints_unmet"
    if job.get("status") != "succeeded" and not (unmet and _has_model(job)):
        if as_json:
            _print_json(job)
        raise (JobCancelled if job.get("status") == "cancelled" else JobFailed)(job)
    client.download_artifact(job_id, "model", out)
    if as_json:
        _print_json(job)
    else:
        _print_summary(job, out)
    if unmet:  # the gate: the model is written, the command fails naming each violation
        raise JobFailed(job)


def _has_model(job: Mapping[str, Any]) -> bool:
    return any(a.get("name") == "model" for a in job.get("artifacts") or [])


def mlflow_export_option(
    uri: str | None, experiment: str | None, register: str | None
) -> dict[str, Any] | None:
    """The spec's ``export`` from ``--mlflow URI [--mlflow-experiment] [--mlflow-register]``."""
    if uri is None:
        if experiment is not None or register is not None:
            raise click.UsageError("--mlflow-experiment and --mlflow-register need --mlflow URI")
        return None
    mlflow: dict[str, Any] = {"tracking_uri": uri}
    if experiment is not None:
        mlflow["experiment"] = experiment
    if register is not None:
        mlflow["registered_model"] = register
    return {"mlflow": mlflow}


def _wait_with_progress(
    client: Client, job_id: str, *, timeout: float | None, poll_interval: float
) -> dict[str, Any]:
    bar = ProgressBar()
    try:
        return client.wait(
            job_id,
            timeout=timeout,
            poll_interval=poll_interval,
            on_progress=bar,
            raise_on_failure=False,
        )
    except KeyboardInterrupt:
        bar.close()
        _error(f"interrupted; job {job_id} goes on (cancel it with: squish jobs cancel {job_id})")
        raise SystemExit(130) from None
    finally:
        bar.close()


def _model_id_or_upload(
    client: Client, value: str, *, name: str | None, model_format: str | None
) -> str:
    path = Path(value)
    if path.is_file():
        click.echo(f"uploading {path.name} ({_fmt_bytes(path.stat().st_size)})", err=True)
        model = client.upload_model(path, name=name, format=model_format or _suffix_format(path))
        return str(model["id"])
    if _looks_like_path(value, MODEL_SUFFIXES):
        raise click.BadParameter(f"no such file: {value}", param_hint="'MODEL'")
    return value


def _dataset_id_or_upload(client: Client, role: str, value: str) -> str:
    path = Path(value)
    if path.is_file():
        click.echo(
            f"uploading {role} data {path.name} ({_fmt_bytes(path.stat().st_size)})", err=True
        )
        return str(client.upload_dataset(path)["id"])
    if _looks_like_path(value, DATA_SUFFIXES):
        raise click.BadParameter(f"no such file: {value}", param_hint="'--dataset'")
    return value


def _batch_keys(*latencies: Mapping[str, Any]) -> list[str]:
    keys: set[str] = set()
    for latency in latencies:
        keys.update(latency)

    def order(key: str) -> tuple[int, str]:
        digits = key.rpartition("_")[2]
        return (int(digits) if digits.isdigit() else 1 << 30, key)

    return sorted(keys, key=order)


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _num(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, int | float) else "-"


def summary_lines(job: Mapping[str, Any], out: Path | None) -> list[str]:
    """The human summary of a finished job's metrics (§6 names)."""
    metrics = job.get("metrics") or {}
    original = metrics.get("original") or {}
    compressed = metrics.get("compressed") or {}
    ratios = metrics.get("ratios") or {}
    lines: list[tuple[str, str]] = []
    if out is not None:
        lines.append(("output", str(out)))
    lines.append(("job", f"{job.get('id')} ({job.get('status')})"))
    if "size_bytes" in original or "size_bytes" in compressed:
        size = f"{_fmt_bytes(original.get('size_bytes'))} -> {_fmt_bytes(compressed.get('size_bytes'))}"
        ratio = ratios.get("size")
        if not isinstance(ratio, int | float):
            o, c = original.get("size_bytes"), compressed.get("size_bytes")
            ratio = (
                o / c if isinstance(o, int | float) and isinstance(c, int | float) and c else None
            )
        if isinstance(ratio, int | float):
            size += f" (ratio {ratio:.2f}x)"
        lines.append(("size", size))
    if "sparsity" in compressed:
        lines.append(("sparsity", f"{_num(compressed.get('sparsity'), '.1%')}"))
    o_lat = _mapping(original.get("latency_ms"))
    c_lat = _mapping(compressed.get("latency_ms"))
    speedups = _mapping(ratios.get("speedup"))
    for key in _batch_keys(o_lat, c_lat):
        o_p50 = _mapping(o_lat.get(key)).get("p50")
        c_p50 = _mapping(c_lat.get(key)).get("p50")
        text = f"{_num(o_p50, '.2f')} ms -> {_num(c_p50, '.2f')} ms"
        speedup = speedups.get(key)
        if isinstance(speedup, int | float):
            text += f" ({speedup:.2f}x)"
        label = key.replace("batch_", "batch ")
        lines.append((f"latency p50 {label}", text))
    if "accuracy" in original or "accuracy" in compressed:
        lines.append(
            (
                "accuracy",
                f"{_num(original.get('accuracy'), '.4f')} -> {_num(compressed.get('accuracy'), '.4f')}",
            )
        )
    fidelity = metrics.get("fidelity") or {}
    shown = [
        f"{k} {_num(fidelity[k], '.4g')}"
        for k in ("top1_agreement", "cosine_similarity", "mse", "max_abs_error")
        if k in fidelity
    ]
    if shown:
        lines.append(("fidelity", ", ".join(shown)))
    width = max(len(label) for label, _ in lines)
    return [f"{label.ljust(width)}  {text}" for label, text in lines]


def _print_summary(job: Mapping[str, Any], out: Path | None) -> None:
    for line in summary_lines(job, out):
        click.echo(line)


class LocalReporter:
    """The engine's reporter for ``--local``: progress on stderr, logs as lines."""

    def __init__(self) -> None:
        self.bar = ProgressBar()
        self.stage: str | None = None

    def progress(self, fraction: float, stage: str | None = None) -> None:
        if stage is not None:
            self.stage = stage
        self.bar({"status": "running", "progress": fraction, "stage": self.stage})

    def log(self, message: str, level: str = "info", data: Mapping[str, Any] | None = None) -> None:
        if level in ("warning", "error"):
            self.bar.close()
            click.echo(f"{level}: {message}", err=True)


def _compress_local(
    model_path: Path,
    model_format: str | None,
    steps: list[tuple[str, dict[str, Any]]],
    datasets: Mapping[str, str],
    output_format: str | None,
    device: str,
    evaluate: Mapping[str, Any],
    out: Path,
    as_json: bool,
    *,
    constraints: Mapping[str, Any] | None = None,
    export: Mapping[str, Any] | None = None,
) -> None:
    if not model_path.is_file():
        raise click.BadParameter(
            f"no such file: {model_path} (--local needs a model file)", param_hint="'MODEL'"
        )
    fmt = detect_format(model_path, model_format)
    dataset_paths: dict[str, Path] = {}
    for role, value in datasets.items():
        path = Path(value)
        if not path.is_file():
            raise click.BadParameter(
                f"{role}: no such file: {value} (--local needs files, not ids)",
                param_hint="'--dataset'",
            )
        dataset_paths[role] = path
    try:
        from worker.errors import EngineError
        from worker.pipeline import PipelineSpec, run_pipeline
    except ImportError as exc:
        raise click.ClickException(
            f"--local needs the compression engine, which is not importable here ({exc}); "
            "install it with: pip install 'squish[engine]'"
        ) from exc
    # What the user left out keeps the engine's defaults.
    spec = PipelineSpec(steps=steps, output_format=output_format or fmt, device=device, **evaluate)
    gate = _LocalGate(constraints, export, list(dataset_paths), spec.batch_sizes)
    reporter = LocalReporter()
    with tempfile.TemporaryDirectory(prefix="squish-local-") as tmp:
        try:
            result = run_pipeline(model_path, fmt, spec, dataset_paths, Path(tmp), reporter)
        except EngineError as exc:
            # A deterministic failure (bad model, unsupported method): like a failed job.
            reporter.bar.close()
            step = getattr(exc, "step", None)
            where = f" (step {step})" if step is not None else ""
            _error(f"{exc.code}: {exc.message}{where}")
            raise SystemExit(EXIT_FAILED) from None
        reporter.bar.close()
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(result.artifact_path, out)
        metrics = getattr(result, "metrics", None) or {}
        unmet = gate.judge(result)
        if not unmet:
            recipe = {
                "pipeline": [{"method": m, "params": p} for m, p in steps],
                "output_format": spec.output_format,
                "evaluate": dict(evaluate),
            }
            gate.export(result, metrics, recipe)
    job = {"id": "local", "status": "failed" if unmet else "succeeded", "metrics": metrics}
    if as_json:
        shown: dict[str, Any] = {"output": str(out), "format": output_format or fmt}
        if gate.active:
            shown |= {"status": job["status"], "violations": [v.model_dump() for v in unmet]}
        _print_json({**shown, "metrics": metrics})
    else:
        _print_summary(job, out)
    if unmet:
        _error(f"constraints_unmet: {gate.message(unmet)} (the model is at {out})")
        raise SystemExit(EXIT_FAILED)


class _LocalGate:
    """``--local``'s constraints and MLflow export: checked before the run as POST /v1/jobs
    checks them (same words), judged and exported after it, as the worker does. Imports
    the engine's modules only when a flag asks for them."""

    def __init__(
        self,
        constraints: Mapping[str, Any] | None,
        export: Mapping[str, Any] | None,
        roles: Sequence[str],
        batch_sizes: Sequence[int],
    ) -> None:
        self.active = bool(constraints or export)
        self.bounds: Any = None
        self.mlflow: Any = None
        if not self.active:
            return
        from pydantic import ValidationError

        from worker.constraints import Constraints, constraint_problems
        from worker.export import Export
        from worker.spec import DatasetInfo

        try:
            self.bounds = Constraints.model_validate(constraints or {})
            self.mlflow = Export.model_validate(export).mlflow if export else None
        except ValidationError as exc:
            raise click.UsageError(_validation_text(exc)) from None
        problems = constraint_problems(
            self.bounds, datasets={role: DatasetInfo() for role in roles}, batch_sizes=batch_sizes
        )
        if problems:
            raise click.UsageError(
                "; ".join(f"{'.'.join(map(str, p.loc))}: {p.msg}" for p in problems)
            )

    def judge(self, result: Any) -> list[Any]:
        if self.bounds is None or self.bounds.is_empty():
            return []
        from worker.constraints import violations

        return list(violations(self.bounds, result.measured))

    def message(self, unmet: Sequence[Any]) -> str:
        from worker.constraints import unmet_message

        return unmet_message(unmet)

    def export(self, result: Any, metrics: Mapping[str, Any], recipe: Mapping[str, Any]) -> None:
        if self.mlflow is None:
            return
        from worker.export import ExportFailed, export_to_mlflow

        files = {"model": result.artifact_path, "report": result.report_path}
        try:
            exported = export_to_mlflow(
                self.mlflow, job_id="local", files=files, metrics=metrics, recipe=recipe
            )
        except ExportFailed as exc:
            click.echo(f"warning: MLflow export failed: {exc}", err=True)
            return
        click.echo(f"exported to MLflow: run {exported.run_id}", err=True)


def _validation_text(exc: Any) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in error['loc']) or 'value'}: {error['msg']}"
        for error in exc.errors()
    )


# -- optimize ----------------------------------------------------------------------

OBJECTIVES = ("latency", "size", "accuracy", "fidelity")
TRIAL_COLUMNS = ("trial", "recipe", "size", "latency", "accuracy", "feasible")


def _recipe_text(trial: Mapping[str, Any]) -> str:
    steps = [str(step.get("method")) for step in trial.get("pipeline") or []]
    return " > ".join([*steps, str(trial.get("output_format", "?"))])


def trial_row(trial: Mapping[str, Any], batch_key: str) -> list[str]:
    """One line of the live trial table."""
    metrics = _mapping(trial.get("metrics"))
    compressed = _mapping(metrics.get("compressed"))
    latency = _mapping(_mapping(compressed.get("latency_ms")).get(batch_key)).get("p50")
    status = trial.get("status")
    if status == "succeeded":
        feasible = (
            "yes"
            if trial.get("feasible")
            else "no: " + ", ".join(str(v.get("constraint")) for v in trial.get("violations") or [])
        )
    else:
        error = _mapping(trial.get("error"))
        feasible = f"{status}: {error.get('message', '')}".rstrip(": ")[:80]
    return [
        str(trial.get("number")),
        _recipe_text(trial),
        _fmt_bytes(compressed.get("size_bytes")),
        f"{_num(latency, '.3f')} ms" if latency is not None else "-",
        _num(compressed.get("accuracy"), ".4f"),
        feasible,
    ]


class TrialTable:
    """Prints each trial of a search once it has finished: a table that grows live."""

    widths = (5, 44, 10, 11, 8, 0)

    def __init__(self, batch_key: str, bar: ProgressBar) -> None:
        self.batch_key, self.bar = batch_key, bar
        self.printed: set[Any] = set()

    def line(self, cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, self.widths, strict=True)).rstrip()

    def __call__(self, job: Mapping[str, Any]) -> None:
        search = _mapping(_mapping(job.get("metrics")).get("search"))
        done = [
            t
            for t in search.get("trials") or []
            if t.get("status") not in ("queued", "running") and t.get("number") not in self.printed
        ]
        if done:
            ProgressBar.interrupt()
            if not self.printed:
                click.echo(self.line(TRIAL_COLUMNS))
            for trial in sorted(done, key=lambda t: t.get("number", 0)):
                self.printed.add(trial.get("number"))
                click.echo(self.line(trial_row(trial, self.batch_key)))
        self.bar(job)


def unmet_lines(job: Mapping[str, Any]) -> list[str]:
    """Why a search found nothing: each unmet constraint with the closest value measured."""
    search = _mapping(_mapping(job.get("metrics")).get("search"))
    lines = []
    for unmet in search.get("unmet") or []:
        closest = unmet.get("closest")
        where = f" (trial {unmet['trial']})" if unmet.get("trial") is not None else ""
        lines.append(
            f"unmet: {unmet.get('constraint')} bound {_num(unmet.get('bound'), '.4g')}, closest "
            f"{_num(closest, '.4g') if closest is not None else 'not measured'}{where}"
        )
    return lines


@cli.command()
@click.argument("model", metavar="MODEL")
@click.option(
    "-d",
    "--data",
    "--dataset",
    "dataset",
    multiple=True,
    metavar="ROLE=PATH|ID",
    help="eval (required), train, calibration data: a file to upload, or a dataset's id.",
)
@constraint_options
@click.option(
    "--objective",
    "objectives",
    multiple=True,
    type=click.Choice(OBJECTIVES),
    help="What to optimize, in priority order; repeatable (default: latency, then size).",
)
@click.option("--method", "methods", multiple=True, help="Only search these methods; repeatable.")
@click.option(
    "--runtime", "runtimes", multiple=True, type=click.Choice(values(RuntimeName)),
    help="Only deliver artifacts in these runtimes; repeatable.",
)  # fmt: skip
@click.option("--max-trials", type=click.IntRange(1, 500), help="Trials at most (default 24).")
@click.option("--max-seconds", type=click.IntRange(min=10), help="Time budget (default 3600).")
@click.option("--parallel-trials", type=click.IntRange(1, 64), help="Trials at once (default 2).")
@click.option(
    "--strategy", type=click.Choice(["tpe", "nsga2", "random", "grid"]), help="Default: tpe."
)
@click.option("--seed", type=click.IntRange(min=0), help="Makes the search reproducible.")
@click.option("--holdout-fraction", type=click.FloatRange(0.1, 0.5), help="Default: 0.3.")
@click.option("--format", "model_format", type=click.Choice(MODEL_FORMATS), help="Input format.")
@click.option("--device", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True)
@click.option(
    "-b", "--batch-size", "batch_sizes", type=click.IntRange(min=1), multiple=True,
    help="Batch size to measure latency at (the first one is the latency objective).",
)  # fmt: skip
@click.option("--name", help="Name of the uploaded model.")
@click.option(
    "-o", "--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
    help="Where to write the best model (the closest one when nothing meets the constraints).",
)  # fmt: skip
@click.option("--timeout", type=click.FloatRange(min=0), help="Stop waiting after this long.")
@click.option("--poll-interval", type=click.FloatRange(min=0), default=1.0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the finished job as JSON.")
@click.pass_context
def optimize(
    ctx: click.Context,
    model: str,
    dataset: tuple[str, ...],
    max_accuracy_drop: float | None,
    min_cosine: float | None,
    max_latency_ms: tuple[str, ...],
    max_size_bytes: int | None,
    min_speedup: tuple[str, ...],
    objectives: tuple[str, ...],
    methods: tuple[str, ...],
    runtimes: tuple[str, ...],
    max_trials: int | None,
    max_seconds: int | None,
    parallel_trials: int | None,
    strategy: str | None,
    seed: int | None,
    holdout_fraction: float | None,
    model_format: str | None,
    device: str,
    batch_sizes: tuple[int, ...],
    name: str | None,
    out: Path,
    timeout: float | None,
    poll_interval: float,
    as_json: bool,
) -> None:
    """Search for the smallest/fastest compression of MODEL that meets the constraints.

    Shows each trial as it finishes, writes the best model to --out, and exits 1 naming
    each unmet constraint (with the closest value measured) when no trial meets them.

    \b
    Example:
      squish optimize model.onnx --data eval=digits.npz --data train=train.npz \\
        --max-accuracy-drop 1 --max-latency-ms 0.5 --objective latency --out best.onnx
    """
    datasets = dict(parse_dataset_option(d) for d in dataset)
    if DatasetRole.eval not in datasets:
        raise click.UsageError("a search needs eval data: --data eval=FILE")
    constraints = constraints_from_options(
        max_accuracy_drop, min_cosine, max_latency_ms, max_size_bytes, min_speedup
    )
    budget = {
        key: value
        for key, value in (
            ("max_trials", max_trials),
            ("max_seconds", max_seconds),
            ("parallel_trials", parallel_trials),
        )
        if value is not None
    }
    sizes = list(dict.fromkeys(batch_sizes))
    for bounds in (constraints.get("latency_ms") or {}, constraints.get("speedup") or {}):
        for key in bounds:  # a bounded batch size is measured
            size = int(key.removeprefix("batch_"))
            if size not in sizes:
                sizes.append(size)
    client = _client(ctx)
    model_id = _model_id_or_upload(client, model, name=name, model_format=model_format)
    dataset_ids = {role: _dataset_id_or_upload(client, role, v) for role, v in datasets.items()}
    job = client.search(
        model_id,
        datasets=dataset_ids,
        constraints=constraints or None,
        objectives=objectives or ("latency", "size"),
        budget=budget or None,
        methods=list(methods) or None,
        runtimes=list(runtimes) or None,
        strategy=strategy,
        seed=seed,
        holdout_fraction=holdout_fraction,
        target={"device": device},
        evaluate={"batch_sizes": sizes} if sizes else None,
    )
    job_id = job["id"]
    click.echo(f"job {job_id} {job.get('status', 'queued')}", err=True)
    bar = ProgressBar()
    table = TrialTable(f"batch_{sizes[0] if sizes else 1}", bar)
    try:
        job = client.wait(
            job_id, timeout=timeout, poll_interval=poll_interval, on_progress=table,
            raise_on_failure=False,
        )  # fmt: skip
    except KeyboardInterrupt:
        bar.close()
        _error(f"interrupted; job {job_id} goes on (cancel it with: squish jobs cancel {job_id})")
        raise SystemExit(130) from None
    finally:
        bar.close()
    names = {a.get("name") for a in job.get("artifacts") or []}
    if "model" in names:
        client.download_artifact(job_id, "model", out)
    if as_json:
        _print_json(job)
    elif job.get("status") == "succeeded":
        best = _mapping(_mapping(job.get("metrics")).get("search")).get("best")
        click.echo(f"best trial {best}")
        _print_summary(job, out)
    if job.get("status") != "succeeded":
        for line in unmet_lines(job):
            click.echo(line, err=True)
        if "model" in names:
            click.echo(f"the closest trial's model is in {out}", err=True)
        raise (JobCancelled if job.get("status") == "cancelled" else JobFailed)(job)


# -- models ------------------------------------------------------------------------

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")
limit_option = click.option("--limit", type=click.IntRange(min=1), help="Show at most this many.")


def _model_fields(model: Mapping[str, Any]) -> None:
    _fields(
        [
            ("id", model.get("id")),
            ("name", model.get("name")),
            ("format", model.get("format")),
            ("size", _fmt_bytes(model.get("size_bytes"))),
            ("sha256", model.get("sha256")),
            ("created", _fmt_time(model.get("created_at"))),
            ("inspection", model.get("inspection_status")),
            ("info", _compact(model["info"]) if model.get("info") else None),
        ],
    )


MODEL_COLUMNS: list[Column] = [
    ("ID", lambda m: m.get("id")),
    ("NAME", lambda m: m.get("name")),
    ("FORMAT", lambda m: m.get("format")),
    ("SIZE", lambda m: _fmt_bytes(m.get("size_bytes"))),
    ("CREATED", lambda m: _fmt_time(m.get("created_at"))),
]


@cli.group()
def models() -> None:
    """Upload, list, show, download and delete models."""


@models.command("list")
@limit_option
@json_option
@click.pass_context
def models_list(ctx: click.Context, limit: int | None, as_json: bool) -> None:
    """List models."""
    items = list(_limited(_client(ctx).list_models(), limit))
    if as_json:
        _print_json(items)
    else:
        _table(items, MODEL_COLUMNS)


@models.command("get")
@click.argument("model_id")
@json_option
@click.pass_context
def models_get(ctx: click.Context, model_id: str, as_json: bool) -> None:
    """Show a model."""
    model = _client(ctx).get_model(model_id)
    if as_json:
        _print_json(model)
    else:
        _model_fields(model)


@models.command("upload")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", help="Display name (default: the file name).")
@click.option(
    "--format", "model_format", type=click.Choice(MODEL_FORMATS), help="Default: from the suffix."
)
@json_option
@click.pass_context
def models_upload(
    ctx: click.Context, path: Path, name: str | None, model_format: str | None, as_json: bool
) -> None:
    """Upload a model file (.pt2 or .onnx)."""
    model = _client(ctx).upload_model(path, name=name, format=model_format)
    if as_json:
        _print_json(model)
    else:
        _model_fields(model)


@models.command("download")
@click.argument("model_id")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.pass_context
def models_download(ctx: click.Context, model_id: str, out: Path) -> None:
    """Download a model's uploaded file."""
    path = _client(ctx).download_model(model_id, out)
    click.echo(f"wrote {path} ({_fmt_bytes(path.stat().st_size)})")


@models.command("delete")
@click.argument("model_id")
@click.pass_context
def models_delete(ctx: click.Context, model_id: str) -> None:
    """Delete a model."""
    _client(ctx).delete_model(model_id)
    click.echo(f"deleted {model_id}")


# -- datasets ----------------------------------------------------------------------

DATASET_COLUMNS: list[Column] = [
    ("ID", lambda d: d.get("id")),
    ("NAME", lambda d: d.get("name")),
    ("FORMAT", lambda d: d.get("format")),
    ("SIZE", lambda d: _fmt_bytes(d.get("size_bytes"))),
    ("CREATED", lambda d: _fmt_time(d.get("created_at"))),
]


def _dataset_fields(dataset: Mapping[str, Any]) -> None:
    _fields(
        [
            ("id", dataset.get("id")),
            ("name", dataset.get("name")),
            ("format", dataset.get("format")),
            ("size", _fmt_bytes(dataset.get("size_bytes"))),
            ("sha256", dataset.get("sha256")),
            ("created", _fmt_time(dataset.get("created_at"))),
            ("info", _compact(dataset["info"]) if dataset.get("info") else None),
        ],
    )


@cli.group()
def datasets() -> None:
    """Upload, list, show and delete datasets (calibration, training, evaluation data)."""


@datasets.command("list")
@limit_option
@json_option
@click.pass_context
def datasets_list(ctx: click.Context, limit: int | None, as_json: bool) -> None:
    """List datasets."""
    items = list(_limited(_client(ctx).list_datasets(), limit))
    if as_json:
        _print_json(items)
    else:
        _table(items, DATASET_COLUMNS)


@datasets.command("get")
@click.argument("dataset_id")
@json_option
@click.pass_context
def datasets_get(ctx: click.Context, dataset_id: str, as_json: bool) -> None:
    """Show a dataset."""
    dataset = _client(ctx).get_dataset(dataset_id)
    if as_json:
        _print_json(dataset)
    else:
        _dataset_fields(dataset)


@datasets.command("upload")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", help="Display name (default: the file name).")
@json_option
@click.pass_context
def datasets_upload(ctx: click.Context, path: Path, name: str | None, as_json: bool) -> None:
    """Upload a dataset file (.npz, .safetensors, .jsonl)."""
    dataset = _client(ctx).upload_dataset(path, name=name)
    if as_json:
        _print_json(dataset)
    else:
        _dataset_fields(dataset)


@datasets.command("delete")
@click.argument("dataset_id")
@click.pass_context
def datasets_delete(ctx: click.Context, dataset_id: str) -> None:
    """Delete a dataset."""
    _client(ctx).delete_dataset(dataset_id)
    click.echo(f"deleted {dataset_id}")


# -- jobs --------------------------------------------------------------------------

JOB_COLUMNS: list[Column] = [
    ("ID", lambda j: j.get("id")),
    ("STATUS", lambda j: j.get("status")),
    ("PROGRESS", lambda j: _fmt_progress(j.get("progress"))),
    ("STAGE", lambda j: j.get("stage")),
    ("MODEL", lambda j: j.get("model_id")),
    ("CREATED", lambda j: _fmt_time(j.get("created_at"))),
]


def _job_fields(job: Mapping[str, Any]) -> None:
    spec = job.get("spec") or {}
    pipeline = " -> ".join(
        f"{s.get('method')}{_compact(s['params']) if s.get('params') else ''}"
        for s in spec.get("pipeline") or []
    )
    error = job.get("error") or {}
    error_text = None
    if error:
        error_text = f"{error.get('code')}: {error.get('message')}"
        if error.get("step") is not None:
            error_text += f" (step {error['step']})"
    artifacts = ", ".join(
        f"{a.get('name')} ({_fmt_bytes(a.get('size_bytes'))})" for a in job.get("artifacts") or []
    )
    _fields(
        [
            ("id", job.get("id")),
            ("status", job.get("status")),
            ("progress", _fmt_progress(job.get("progress"))),
            ("stage", job.get("stage")),
            ("model", job.get("model_id")),
            ("pipeline", pipeline),
            ("error", error_text),
            ("artifacts", artifacts),
            ("attempts", job.get("attempts")),
            ("cached", f"from {job['cached_from']}" if job.get("cached_from") else None),
            ("created", _fmt_time(job.get("created_at"))),
            ("started", _fmt_time(job.get("started_at")) if job.get("started_at") else None),
            ("finished", _fmt_time(job.get("finished_at")) if job.get("finished_at") else None),
        ],
    )
    # A constraints_unmet job keeps what it measured: shown like a success's.
    if job.get("status") in ("succeeded", "failed") and job.get("metrics"):
        click.echo("")
        for line in summary_lines(job, None)[1:]:
            click.echo(line)


@cli.group()
def jobs() -> None:
    """List, show, follow and cancel compression jobs."""


@jobs.command("list")
@click.option("--status", type=click.Choice(JOB_STATUSES), help="Only jobs in this status.")
@limit_option
@json_option
@click.pass_context
def jobs_list(ctx: click.Context, status: str | None, limit: int | None, as_json: bool) -> None:
    """List jobs."""
    items = list(_limited(_client(ctx).list_jobs(status=status), limit))
    if as_json:
        _print_json(items)
    else:
        _table(items, JOB_COLUMNS)


@jobs.command("get")
@click.argument("job_id")
@json_option
@click.pass_context
def jobs_get(ctx: click.Context, job_id: str, as_json: bool) -> None:
    """Show a job, with its metrics once it has succeeded."""
    job = _client(ctx).get_job(job_id)
    if as_json:
        _print_json(job)
    else:
        _job_fields(job)


@jobs.command("cancel")
@click.argument("job_id")
@json_option
@click.pass_context
def jobs_cancel(ctx: click.Context, job_id: str, as_json: bool) -> None:
    """Cancel a queued or running job."""
    job = _client(ctx).cancel_job(job_id)
    if as_json:
        _print_json(job)
    else:
        click.echo(f"job {job.get('id', job_id)} {job.get('status')}")


@jobs.command("wait")
@click.argument("job_id")
@click.option("--timeout", type=click.FloatRange(min=0), help="Give up after this many seconds.")
@click.option("--poll-interval", type=click.FloatRange(min=0), default=1.0, show_default=True)
@json_option
@click.pass_context
def jobs_wait(
    ctx: click.Context, job_id: str, timeout: float | None, poll_interval: float, as_json: bool
) -> None:
    """Wait for a job to finish, showing its progress; exit 1 unless it succeeded."""
    job = _wait_with_progress(_client(ctx), job_id, timeout=timeout, poll_interval=poll_interval)
    if as_json:
        _print_json(job)
    else:
        _job_fields(job)
    if job.get("status") == "failed":
        raise JobFailed(job)
    if job.get("status") == "cancelled":
        raise JobCancelled(job)


@jobs.command("events")
@click.argument("job_id")
@click.option("--last-event-id", metavar="ID", help="Start after this event.")
@json_option
@click.pass_context
def jobs_events(ctx: click.Context, job_id: str, last_event_id: str | None, as_json: bool) -> None:
    """Follow a job's events until it finishes (one JSON object per line with --json)."""
    for event in _client(ctx).events(job_id, last_event_id=last_event_id):
        if as_json:
            click.echo(json.dumps(event, default=str))
            continue
        level = event.get("level") or "info"
        marker = "" if level == "info" else f"{level}: "
        click.echo(
            f"{_fmt_time(event.get('created_at'))}  {event.get('kind', '')!s:<8}  "
            f"{marker}{event.get('message', '')}".rstrip()
        )


DELIVERY_COLUMNS: list[Column] = [
    ("ATTEMPT", lambda d: d.get("attempt")),
    ("OUTCOME", lambda d: d.get("outcome")),
    ("STATUS", lambda d: d.get("status_code")),
    ("MS", lambda d: f"{d['duration_ms']:.0f}" if d.get("duration_ms") is not None else None),
    ("AT", lambda d: _fmt_time(d.get("created_at"))),
    ("ERROR", lambda d: d.get("error")),
]


@jobs.command("deliveries")
@click.argument("job_id")
@json_option
@click.pass_context
def jobs_deliveries(ctx: click.Context, job_id: str, as_json: bool) -> None:
    """List the attempts to deliver a job's webhook."""
    items = _client(ctx).list_deliveries(job_id)
    if as_json:
        _print_json(items)
    elif not items:
        click.echo("no webhook delivery attempts (yet)")
    else:
        _table(items, DELIVERY_COLUMNS)


@jobs.command("card")
@click.argument("job_id")
@click.option(
    "-o", "--out", type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write it (default: JOB_ID-card.html here).",
)  # fmt: skip
@click.option("--open", "open_it", is_flag=True, help="Open it in the default web browser.")
@click.pass_context
def jobs_card(ctx: click.Context, job_id: str, out: Path | None, open_it: bool) -> None:
    """Download a job's compression card (one HTML file that opens offline)."""
    path = _client(ctx).download_card(job_id, out)
    click.echo(f"wrote {path} ({_fmt_bytes(path.stat().st_size)})")
    if open_it:
        import webbrowser

        if not webbrowser.open(path.resolve().as_uri()):
            click.echo(f"no browser could be started; open {path} yourself", err=True)


# -- webhook secret ----------------------------------------------------------------


@cli.group("webhook-secret")
def webhook_secret() -> None:
    """Show or rotate the secret that signs your webhooks (squish.webhooks.verify)."""


def _secret_fields(secret: Mapping[str, Any]) -> None:
    expires = secret.get("previous_expires_at")
    _fields(
        [
            ("secret", secret.get("secret")),
            ("created", _fmt_time(secret.get("created_at"))),
            ("previous signs until", _fmt_time(expires) if expires else None),
        ]
    )


@webhook_secret.command("show")
@json_option
@click.pass_context
def webhook_secret_show(ctx: click.Context, as_json: bool) -> None:
    """Print the current signing secret."""
    secret = _client(ctx).webhook_secret()
    if as_json:
        _print_json(secret)
    else:
        _secret_fields(secret)


@webhook_secret.command("rotate")
@json_option
@click.pass_context
def webhook_secret_rotate(ctx: click.Context, as_json: bool) -> None:
    """Replace the signing secret; the old one keeps signing beside it for 24 h."""
    secret = _client(ctx).rotate_webhook_secret()
    if as_json:
        _print_json(secret)
    else:
        _secret_fields(secret)


# -- artifacts ---------------------------------------------------------------------


@cli.group()
def artifacts() -> None:
    """Download what jobs produced (the compressed model, the report)."""


@artifacts.command("get")
@click.argument("job_id")
@click.argument("name")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option(
    "--no-resume", is_flag=True, help="Start over instead of continuing a partial download."
)
@click.pass_context
def artifacts_get(ctx: click.Context, job_id: str, name: str, out: Path, no_resume: bool) -> None:
    """Download artifact NAME (model, report) of a job, checking its sha256."""
    path = _client(ctx).download_artifact(job_id, name, out, resume=not no_resume)
    click.echo(f"wrote {path} ({_fmt_bytes(path.stat().st_size)})")


# -- methods -----------------------------------------------------------------------


METHOD_COLUMNS: list[Column] = [
    ("NAME", lambda m: m.get("name")),
    ("FORMATS", lambda m: ",".join(m.get("formats") or [])),
    ("NEEDS", lambda m: ",".join(m.get("datasets_required") or [])),
    ("DEVICES", lambda m: ",".join(m.get("devices") or [])),
    ("SUMMARY", lambda m: m.get("summary")),
]


@cli.command("methods")
@click.option("--verbose", "-v", is_flag=True, help="Also list each method's parameters.")
@json_option
@click.pass_context
def methods_cmd(ctx: click.Context, verbose: bool, as_json: bool) -> None:
    """List the compression methods and their parameters."""
    items = _client(ctx).methods()
    if as_json:
        _print_json(items)
        return
    _table(items, METHOD_COLUMNS)
    if verbose:
        for item in items:
            props = (item.get("params_schema") or {}).get("properties") or {}
            if not props:
                continue
            click.echo(f"\n{item.get('name')}")
            for key, schema in props.items():
                default = f" (default {_compact(schema['default'])})" if "default" in schema else ""
                description = schema.get("description") or schema.get("title") or ""
                click.echo(f"  {key}{default}  {description}".rstrip())


if __name__ == "__main__":  # pragma: no cover
    main()
