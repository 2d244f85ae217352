"""Where a run's numbers go: ``metrics.jsonl`` in the run directory, and an MLflow run (rank 0 only).

MLflow logging never blocks the training loop: metrics go to a queue that a background thread
sends in batches. When the server is unreachable the thread warns once, keeps what it holds and
retries; the end of the run flushes and says what could not be sent (and keeps it in
``run.dir/unsent_metrics.jsonl``). A restarted run reopens the same MLflow run (its id lives in
``run.dir/mlflow_run.json``) and skips the steps that run already holds, so every metric's steps
stay strictly increasing.
"""

from __future__ import annotations

import io
import json
import logging
import os
import platform
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline.checkpoint import atomic_write_bytes, library_versions
from pipeline.config import flatten
from pipeline.signals import StopRequested

log = logging.getLogger(__name__)


def telemetry_off() -> None:
    """Switch MLflow's usage telemetry off in this process and every process it starts. Its config thread deletes
    ``_MLFLOW_TELEMETRY_SESSION_ID`` from ``os.environ`` when it cannot fetch its config (always, without a
    network), which breaks any reader iterating the environment at that moment (``KeyError``)."""
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    if "mlflow" in sys.modules:  # imported before us: its client was set up already
        from mlflow.telemetry import set_telemetry_client

        set_telemetry_client()


telemetry_off()  # before any import of mlflow: every process of ours imports this module first (train, launchers)

RUN_ID_FILE = "mlflow_run.json"
# MLflow's UI opens an experiment in its GenAI view unless told otherwise. The tag names the experiment's kind
# (UIs that read it open the runs); MLflow 3.17's own UI follows its workflow switch instead, which a link sets
# with the query parameter below.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
TRAINING_VIEW = "workflowType=machine_learning"
SECRET_NAME = re.compile(r"PASSWORD|TOKEN|SECRET|API_KEY|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)
USERINFO = re.compile(r"(\b[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.IGNORECASE)


class TrackingError(RuntimeError):
    """The tracking server is required (``tracking.required``) and cannot be reached."""


class RegistrationError(RuntimeError):
    """The run could not be registered in MLflow; ``cause`` is why, ``outcome`` what became of the MLflow run."""

    def __init__(self, cause: BaseException, outcome: str):
        super().__init__(str(cause))
        self.cause, self.outcome = cause, outcome


class MetricsFile:
    """Appends one JSON object per event (``train``, ``val``, ...) to ``run.dir/metrics.jsonl``.

    ``keep`` lines of an earlier attempt are kept and the rest dropped, so a run resumed from a
    checkpoint that was saved after ``keep`` lines logs each step exactly once.
    """

    def __init__(self, path: str | Path, keep: int = 0):
        self.path = Path(path)
        kept = self.path.read_text().splitlines(keepends=True)[:keep] if self.path.exists() else []
        atomic_write_bytes(self.path, "".join(kept).encode())
        self.lines = len(kept)
        self._file = open(self.path, "a", buffering=1)  # line-buffered: a crash loses at most one line

    def log(self, event: str, **fields: Any) -> None:
        self._file.write(json.dumps({"event": event, "time": round(time.time(), 3), **fields}) + "\n")
        self.lines += 1

    def close(self) -> None:
        self._file.close()


def environment() -> dict[str, str]:
    """A copy of the environment that another thread's changes cannot break: ``dict(os.environ)`` and
    ``os.environ.items()`` look each listed name up again, and raise ``KeyError`` if it went in between."""
    names = list(os.environ)  # one atomic copy of the names
    values = {name: os.environ.get(name) for name in names}
    return {name: value for name, value in values.items() if value is not None}


def redact(text: str) -> str:
    """``text`` without the values of secret-looking environment variables or credentials in URLs."""
    for name, value in environment().items():
        if SECRET_NAME.search(name) and len(value) >= 4:
            text = text.replace(value, "***")
    return USERINFO.sub(r"\1***@", text)


def default_uri(run_dir: str | Path) -> str:
    """An SQLite store beside the run directories (absolute, so any working directory finds it)."""
    return f"sqlite:///{Path(run_dir).absolute().parent / 'mlflow.db'}"


NETWORK_FILESYSTEMS = ("nfs", "nfs4", "lustre", "gpfs", "cifs", "smb3", "smbfs", "beegfs", "ceph", "glusterfs",
                       "fuse.sshfs", "fuse.glusterfs", "fuse.cephfs", "9p")


def filesystem_type(path: str | Path, mountinfo: str | None = None) -> str:
    """The type of the filesystem that holds ``path`` (nfs4, lustre, ext4, ...), from the mount table; "" if the
    table cannot be read. ``mountinfo``: the text of /proc/self/mountinfo (read when None)."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return ""
    path, best, kind = str(Path(path).resolve()), "", ""  # a symlink to /lustre is on lustre
    for line in mountinfo.splitlines():
        fields = line.split(" - ", 1)
        if len(fields) != 2 or len(fields[0].split()) < 5:
            continue
        point = fields[0].split()[4].replace("\\040", " ")
        if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, kind = point, fields[1].split()[0]
    return kind


def shared_sqlite_problem(uri: str, jobs: int, mountinfo: str | None = None) -> str | None:
    """Why ``jobs`` jobs should not write the SQLite store ``uri`` at once, or None (a server, a local disk)."""
    if not uri.startswith("sqlite:///"):
        return None
    store = Path(uri.removeprefix("sqlite:///"))
    kind = filesystem_type(store.parent, mountinfo)
    if kind not in NETWORK_FILESYSTEMS:
        return None
    return (f"The MLflow store {store} is one SQLite file on a network filesystem ({kind}), where SQLite's locks "
            f"are not reliable: {'these ' + str(jobs) + ' jobs' if jobs > 1 else 'jobs'} writing it at once can "
            "corrupt it or lose runs. Run a tracking server on the login node and point the jobs at it: "
            "`mlflow server --backend-store-uri sqlite:////path/on/a/local/disk/mlflow.db --artifacts-destination "
            "/shared/mlartifacts --host 0.0.0.0 --port 5000`, then tracking.uri=http://LOGIN-NODE:5000 "
            "(README: \"Reviewing runs in MLflow\"); or tracking.backend=none.")


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def attempt_tags(world_size: int, hosts: list[str]) -> dict[str, str]:
    """Where and with what this attempt runs; tags, since they may change from one restart to the next."""
    import torch

    versions = library_versions()
    tags = {"world_size": str(world_size), "hosts": ",".join(sorted(set(hosts))),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)",
            "git_commit": _git_commit() or "unknown", "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
            "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT", "0"), "python": platform.python_version()}
    tags.update({f"version.{name}": str(version) for name, version in versions.items()})
    return {k: redact(v) for k, v in tags.items() if v != ""}


@dataclass
class Picture:
    """An image for the run's step-indexed image charts (``MlflowClient.log_image`` with a key)."""

    key: str
    png: bytes  # the encoded file: small while an outage holds it, decoded when sent
    step: int
    tries: int = 0


PICTURE_TRIES = 3  # failed uploads while the server answers, before a picture is dropped


@dataclass
class Upload:
    """A file for the run's artifacts, under the artifact folder ``folder``."""

    path: Path
    folder: str
    tries: int = 0


class _Sender(threading.Thread):
    """Sends queued metrics in batches, then pictures; holds both through an outage and retries.

    A picture that cannot be stored while the server answers (an artifact store the job cannot
    reach) is dropped after ``PICTURE_TRIES`` tries with a warning: it never holds up the metrics.
    """

    def __init__(self, client, run_id: str, uri: str, retry_s: float = 2.0):
        super().__init__(name="mlflow-sender", daemon=True)
        self.client, self.run_id, self.uri, self.retry_s = client, run_id, uri, retry_s
        self.queue: queue.Queue = queue.Queue()
        self.pending: list = []
        self.pictures: list[Picture] = []
        self.uploads: list[Upload] = []
        self.down_since: float | None = None
        self._closing = threading.Event()
        self._deadline = 0.0

    def run(self) -> None:
        while True:
            self._drain(timeout=0.5)
            sent = self._send() if self.pending else True
            if sent and self.pictures:
                sent = self._send_pictures()
            if sent and self.uploads:
                sent = self._send_uploads()
            if not sent:
                if self._closing.is_set() and time.monotonic() > self._deadline:
                    return  # the server is still away: close() reports what is left
                time.sleep(self.retry_s)
            elif (self._closing.is_set() and self.queue.empty() and not self.pending and not self.pictures
                  and not self.uploads):
                return

    def _drain(self, timeout: float) -> None:
        try:
            item = self.queue.get(timeout=timeout)
            while True:
                held = self.pictures if isinstance(item, Picture) else self.uploads if isinstance(item, Upload) \
                    else self.pending
                held.append(item)
                item = self.queue.get_nowait()
        except queue.Empty:
            pass

    def _down(self, err: Exception) -> bool:
        if self.down_since is None:
            self.down_since = time.monotonic()
            log.warning("MLflow server %s is unreachable (%s). Training goes on; metrics are kept and sent "
                        "when it is back.", redact(self.uri), str(err).splitlines()[0][:200])
        return False

    def _up(self) -> bool:
        if self.down_since is not None:
            log.warning("MLflow server %s is back after %.0fs; buffered metrics sent.", redact(self.uri),
                        time.monotonic() - self.down_since)
            self.down_since = None
        return True

    def _send(self) -> bool:
        try:
            while self.pending:
                batch = self.pending[:1000]
                self.client.log_batch(self.run_id, metrics=batch)
                del self.pending[:len(batch)]
        except Exception as err:
            return self._down(err)
        return self._up()

    def _send_pictures(self) -> bool:
        """Send the held pictures; False while the server is away (they are kept)."""
        from PIL import Image

        def send(picture: Picture) -> None:
            with Image.open(io.BytesIO(picture.png)) as image:
                self.client.log_image(self.run_id, image, key=picture.key, step=picture.step)

        return self._send_each(self.pictures, send, lambda picture, tries, err: (
            f"Could not store image {picture.key} (step {picture.step}) in the MLflow run after {tries} tries "
            f"({err}); it is dropped, and run.dir/insights holds the latest pictures."))

    def _send_uploads(self) -> bool:
        """Upload the held files; False while the server is away (they are kept)."""
        return self._send_each(
            self.uploads, lambda upload: self.client.log_artifact(self.run_id, str(upload.path),
                                                                  artifact_path=upload.folder),
            lambda upload, tries, err: f"Could not store {upload.path} in the MLflow run after {tries} tries "
                                       f"({err}); it stays in the run dir.")

    def _send_each(self, held: list, send, dropped) -> bool:
        """``send`` each of ``held`` in turn, removing it once sent; False while the server is away (they are
        kept). One that fails while the server answers is tried again later, and dropped after ``PICTURE_TRIES``
        tries with the warning ``dropped(item, tries, reason)``."""
        while held:
            item = held[0]
            try:
                send(item)
            except Exception as err:
                try:
                    self.client.get_run(self.run_id)  # does the server answer at all?
                except Exception:
                    return self._down(err)
                item.tries += 1
                if item.tries >= PICTURE_TRIES:
                    log.warning(dropped(item, item.tries, str(err).splitlines()[0][:200]))
                    del held[0]
                return True
            del held[0]
        return self._up()

    def close(self, timeout: float) -> list:
        """Stop after sending what is queued (waiting at most ``timeout`` seconds); returns the metrics not sent
        (the pictures not sent stay in ``pictures``)."""
        self._deadline = time.monotonic() + timeout
        self._closing.set()
        self.join(timeout + self.retry_s + 15)
        self._drain(timeout=0)
        return list(self.pending)


def _short_requests() -> None:
    # one failed request must not hold the caller for minutes: the sender retries by itself
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # the URL may hold credentials


def connect(uri: str):
    """An MlflowClient for ``uri`` that has answered once (raises if the server cannot be reached)."""
    from mlflow import MlflowClient

    _short_requests()
    client = MlflowClient(uri)
    client.search_experiments(max_results=1)
    return client


def store_file(uri: str) -> Path | None:
    """The local file or folder behind a ``sqlite:///`` or file store ``uri``; None for a server."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///"))
    if uri.startswith("file://"):
        return Path(uri.removeprefix("file://"))
    return None if "://" in uri else Path(uri)


def _head(path: Path) -> bytes:
    with path.open("rb") as file:
        return file.read(16)


def _store_fault(path: Path, sqlite: bool) -> str:
    """What is wrong with the local store at ``path`` (an SQLite file if ``sqlite``), as far as the filesystem
    tells, and the fix."""
    folder = path.parent
    if not folder.is_dir():
        return f"its folder {folder} does not exist: create it, or point tracking.uri elsewhere"
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        return f"this user cannot read and write {path}: fix its permissions, or point tracking.uri elsewhere"
    if not path.exists() and not os.access(folder, os.W_OK | os.X_OK):
        return f"this user cannot create files in {folder}: fix its permissions, or point tracking.uri elsewhere"
    if sqlite and path.is_file() and path.stat().st_size and _head(path) != b"SQLite format 3\x00":
        return f"{path} is not an SQLite database: move it aside, or point tracking.uri elsewhere"
    return (f"check the file (sqlite3 {path} 'PRAGMA integrity_check'), that no other program holds it locked, "
            "and that its filesystem has room")


def unreachable(uri: str, err: BaseException) -> str:
    """What to tell a person whose MLflow store ``uri`` failed with ``err``: a server that cannot be reached, or a
    local store file and what is wrong with it; with what became of a half-registered run (credentials redacted)."""
    outcome = f" {err.outcome}" if isinstance(err, RegistrationError) else ""
    cause = err.cause if isinstance(err, RegistrationError) else err
    reason = f"{type(cause).__name__}: {str(cause).splitlines()[0][:300]}" if str(cause) else type(cause).__name__
    path = store_file(uri)
    if path is None:
        return (f"Cannot reach the MLflow tracking server at {redact(uri)} ({reason}).{outcome} Start it "
                "(mlflow server ...), fix tracking.uri, or set tracking.backend=none")
    sqlite = uri.startswith("sqlite:")
    fault = _store_fault(path, sqlite)
    if fault.startswith("check the file") and not isinstance(cause, OSError) and \
            not type(cause).__module__.startswith(("mlflow", "sqlalchemy", "sqlite3")):
        fault = (f"{path} looks sound: the registration itself failed; run again, and report it with run.dir's "
                 "train.log if it repeats")
    return (f"Cannot register the run in the MLflow store {path} (a local {'SQLite file' if sqlite else 'file store'}"
            f", not a server) ({reason}).{outcome} {fault[0].upper()}{fault[1:]}; or set tracking.backend=none")


def abandon_run(client, run_id: str, run_dir: Path, created: bool) -> str:
    """End a run whose registration failed so that it is never left RUNNING or SCHEDULED: a run this attempt created
    is deleted (with its ``mlflow_run.json``: the next attempt registers anew), a reopened one is marked FAILED.
    Returns what was done, as a sentence."""
    try:
        if created:
            client.delete_run(run_id)
            with suppress(OSError):
                (run_dir / RUN_ID_FILE).unlink(missing_ok=True)
            return f"The MLflow run {run_id} it had begun is deleted."
        client.set_terminated(run_id, status="FAILED")
        return f"The MLflow run {run_id} is marked FAILED."
    except Exception as err:  # noqa: BLE001 - the store that failed may refuse this too: say so
        return f"The MLflow run {run_id} could not be ended either ({type(err).__name__}: {str(err)[:200]})."


def tracking_uri(cfg: DictConfig) -> str:
    return cfg.tracking.uri or default_uri(cfg.run.dir)


def open_run(client, cfg: DictConfig, run_dir: Path, uri: str, status: str | None = None) -> tuple[str, bool]:
    """Reopen the run named in ``run_dir/mlflow_run.json`` or create it, logging the params once.

    Returns (run id, reopened). ``status`` (e.g. SCHEDULED, for a job still in the queue) is set on a new run.
    """
    id_file = run_dir / RUN_ID_FILE
    if id_file.is_file():
        return json.loads(id_file.read_text())["run_id"], True
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is None:
        location = None
        if uri.startswith("sqlite:"):  # keep artifacts beside the SQLite store, not in the cwd
            location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
        experiment_id = client.create_experiment(cfg.tracking.experiment, artifact_location=location,
                                                 tags=dict([EXPERIMENT_KIND]))
    else:
        experiment_id = experiment.experiment_id
        if EXPERIMENT_KIND[0] not in experiment.tags:  # made by an older version, or by hand
            client.set_experiment_tag(experiment_id, *EXPERIMENT_KIND)
    run = client.create_run(experiment_id, run_name=cfg.tracking.run_name or Path(cfg.run.dir).name)
    from mlflow.entities import Param

    try:
        flat = flatten(OmegaConf.to_container(cfg, resolve=True))
        params = [Param(k, redact(str(v))[:6000]) for k, v in flat.items()]
        for start in range(0, len(params), 100):
            client.log_batch(run.info.run_id, params=params[start:start + 100])
        if status:
            client.update_run(run.info.run_id, status=status)
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(id_file, json.dumps({"run_id": run.info.run_id, "experiment_id": experiment_id,
                                                "tracking_uri": redact(uri)}).encode())
    except Exception as err:
        raise RegistrationError(err, abandon_run(client, run.info.run_id, run_dir, created=True)) from err
    return run.info.run_id, False


def run_link(uri: str, run_dir: Path) -> str:
    """Where a person finds the run of ``run_dir``: a UI address (in the training view), or the command that
    serves a local store."""
    ids = json.loads((run_dir / RUN_ID_FILE).read_text())
    if uri.startswith(("http://", "https://")):
        return (f"{redact(uri).rstrip('/')}/#/experiments/{ids['experiment_id']}/runs/{ids['run_id']}"
                f"?{TRAINING_VIEW}")
    return f"run {ids['run_id']}: mlflow ui --backend-store-uri {redact(uri)}"


class Tracker:
    """Rank 0's MLflow run: params once, tags per attempt, metrics in the background, artifacts at the end."""

    def __init__(self, cfg: DictConfig, run_dir: Path, world_size: int, hosts: list[str],
                 nodes: list[str | None] | None = None):
        import mlflow

        self.cfg, self.run_dir = cfg.tracking, run_dir
        self.uri = tracking_uri(cfg)
        self.client = connect(self.uri)
        self.run_id, resumed = open_run(self.client, cfg, run_dir, self.uri)
        try:
            self._begin(world_size, hosts, nodes, resumed)
        except Exception as err:
            active = mlflow.active_run()
            if active and active.info.run_id == self.run_id:  # or the exit handler marks it FINISHED
                with suppress(Exception):
                    mlflow.end_run(status="FAILED")
            raise RegistrationError(err, abandon_run(self.client, self.run_id, run_dir, created=not resumed)) from err
        log.info("MLflow run %s in experiment '%s' at %s%s", self.run_id, self.cfg.experiment, redact(self.uri),
                 " (reopened)" if resumed else "")

    def _begin(self, world_size: int, hosts: list[str], nodes: list[str | None] | None, resumed: bool) -> None:
        """Reopen the registered run for this attempt: its steps so far, system metrics, tags, the sender."""
        import mlflow
        from mlflow.system_metrics import set_system_metrics_node_id

        self.skip_until = self._logged_steps() if resumed else {}
        mlflow.set_tracking_uri(self.uri)
        if nodes and nodes[0]:  # on several nodes: system/node0/..., system/node1/...
            set_system_metrics_node_id(nodes[0])
        mlflow.start_run(run_id=self.run_id, log_system_metrics=self.cfg.system_metrics)
        logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)  # outages are reported once, below
        tags = attempt_tags(world_size, hosts)
        if nodes and nodes[0]:  # which host each node's system/<node>/ metrics describe
            tags["system_metrics_nodes"] = ", ".join(f"{node}={hosts[rank]}" for rank, node in enumerate(nodes) if node)
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)
        self.sender = _Sender(self.client, self.run_id, self.uri)
        self.sender.start()

    def _logged_steps(self) -> dict[str, int]:
        """The last step the reopened run holds, per metric (the run's latest values carry the highest step)."""
        data = self.client.get_run(self.run_id).data
        latest = getattr(data, "_metric_objs", None)
        if latest is not None:  # one request, however many metrics (grad_norm/* alone are dozens)
            return {m.key: m.step for m in latest}
        return {k: max((m.step for m in self.client.get_metric_history(self.run_id, k)), default=-1)
                for k in data.metrics}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue ``metrics`` at ``step``; steps an earlier attempt already sent are skipped."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for key, value in metrics.items():
            if step > self.skip_until.get(key, -1):
                self.sender.queue.put(Metric(key, float(value), now, step))

    def set_tag(self, key: str, value: str) -> None:
        """Tag the run now (secrets redacted); a tag that cannot be sent is a warning, never the run's end."""
        try:
            self.client.set_tag(self.run_id, key, redact(value)[:4000])
        except Exception as err:  # noqa: BLE001 - the tracking server's outage is reported, training goes on
            log.warning("Could not tag the MLflow run %s with %s: %s", self.run_id, key, err)

    def log_param(self, key: str, value: str) -> None:
        """A param of the run (write-once: an attempt after the first logs the same value); a warning on failure."""
        try:
            self.client.log_param(self.run_id, key, value)
        except Exception as err:  # noqa: BLE001 - the tracking server's outage is reported, training goes on
            log.warning("Could not log the param %s of the MLflow run %s: %s", key, self.run_id, err)

    def log_image(self, key: str, path: Path, step: int) -> None:
        """Queue the PNG at ``path`` as image ``key`` at ``step``, and again at step 0 as the latest: the UI's image
        card opens at step 0 and shows there the last one logged (a slider reaches the others)."""
        png = Path(path).read_bytes()
        self.sender.queue.put(Picture(key, png, step))
        if step != 0:
            self.sender.queue.put(Picture(key, png, 0))

    def log_artifacts(self, paths: list[Path], folder: str) -> None:
        """Queue the files ``paths`` for the run's artifact folder ``folder``; sent in the background."""
        for path in paths:
            self.sender.queue.put(Upload(Path(path), folder))

    def _register(self, name: str) -> None:
        """Register the uploaded ``model_final.pt`` as a new version of the model ``name``."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(name)
        except MlflowException:
            self.client.create_registered_model(name)
        source = f"{self.client.get_run(self.run_id).info.artifact_uri}/model_final.pt"
        version = self.client.create_model_version(name, source=source, run_id=self.run_id)
        log.info("Registered model_final.pt as model '%s' version %s", name, version.version)

    def finish(self, artifacts: list[Path], status: str = "FINISHED", reason: str = "") -> None:
        """Flush the metrics, upload the artifacts (secrets redacted from text files), end the run; ``reason``
        (why it failed) becomes its ``failure_reason`` tag."""
        import mlflow

        if reason:
            try:
                self.client.set_tag(self.run_id, "failure_reason", redact(reason)[:4000])
            except Exception as err:
                log.warning("Could not tag the MLflow run %s with why it failed: %s", self.run_id, err)

        unsent = self.sender.close(timeout=self.cfg.flush_timeout_s)
        if self.sender.pictures:
            log.warning("%d images could not be sent to %s; run dir %s/insights holds the latest ones.",
                        len(self.sender.pictures), redact(self.uri), self.run_dir)
        if self.sender.uploads:
            log.warning("%d files could not be sent to %s; they stay in run dir %s.", len(self.sender.uploads),
                        redact(self.uri), self.run_dir)
        if unsent:
            path = self.run_dir / "unsent_metrics.jsonl"
            atomic_write_bytes(path, "".join(json.dumps({"key": m.key, "value": m.value, "step": m.step,
                                                         "timestamp": m.timestamp}) + "\n" for m in unsent).encode())
            log.warning("%d metric values could not be sent to %s; they are kept in %s", len(unsent),
                        redact(self.uri), path)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                for path in artifacts:
                    if not path.is_file():
                        continue
                    if path.suffix in (".yaml", ".json", ".log", ".jsonl", ".txt"):
                        clean = Path(tmp) / path.name
                        clean.write_text(redact(path.read_text()))
                        path = clean
                    self.client.log_artifact(self.run_id, str(path))
            if self.cfg.register_model and status == "FINISHED":
                self._register(self.cfg.register_model)
        except Exception as err:
            log.warning("Could not upload the artifacts to %s (%s); they stay in %s.", redact(self.uri),
                        str(err).splitlines()[0][:200], self.run_dir)
        try:
            mlflow.end_run(status=status)
        except Exception as err:
            log.warning("Could not mark the MLflow run %s as %s: %s", self.run_id, status, err)


def open_tracker(cfg: DictConfig, run_dir: Path, world_size: int, hosts: list[str],
                 nodes: list[str | None] | None = None) -> Tracker | None:
    """The MLflow tracker (rank 0, ``tracking.backend=mlflow``), or None; an unreachable server is explained.
    ``nodes``: each rank's node name for system metrics (:func:`pipeline.train.node_ids`)."""
    if cfg.tracking.backend != "mlflow":
        return None
    try:
        return Tracker(cfg, run_dir, world_size, hosts, nodes)
    except Exception as err:
        message = unreachable(tracking_uri(cfg), err)
        if cfg.tracking.required:
            raise TrackingError(message + ".") from None
        log.warning("%s. Training goes on WITHOUT tracking (tracking.required=false).", message)
        return None


def start_node_metrics(cfg: DictConfig, run_id: str, node_id: str):
    """This node's system metrics (CPU, memory, GPU where NVML is there) as ``system/<node_id>/...`` of rank 0's
    run ``run_id``, from a background thread: the run is neither reopened nor ended from this node, and a server
    that goes away costs these metrics (the thread stops), never a step. Returns the monitor to ``finish()``, or
    None (off, or it could not start: a warning)."""
    if cfg.tracking.backend != "mlflow" or not cfg.tracking.system_metrics:
        return None
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        _short_requests()
        logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)
        monitor = SystemMetricsMonitor(run_id, resume_logging=True, node_id=node_id, tracking_uri=tracking_uri(cfg))
        monitor.start()
        return monitor
    except Exception as err:  # noqa: BLE001 - a node's system metrics are not worth a run
        log.warning("Could not log this node's system metrics (%s) into MLflow run %s: %s", node_id, run_id,
                    redact(str(err))[:300])
        return None


@contextmanager
def finish_on_error(tracker: Tracker | None, log_file: Path) -> Iterator[None]:
    """Ends the MLflow run if training stops early: KILLED after a stop signal, FAILED on an error."""
    try:
        yield
    except StopRequested:
        if tracker:
            tracker.finish([], status="KILLED")
        raise
    except BaseException as err:
        if tracker:
            tracker.finish([log_file], status="FAILED", reason=f"{type(err).__name__}: {err}")
        raise
