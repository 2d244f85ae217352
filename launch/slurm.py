"""Submit training to SLURM with submitit: one task per GPU on every node, requeued and resumed after a
time-out or a preemption.

    python -m launch.slurm CONFIG [key=value ...] [--dry-run] [--wait] [--sweep KEY=V1,V2 ...]
    python -m launch.slurm status RUN_DIR
    python -m launch.slurm cancel RUN_DIR

Everything is checked on the login node before anything is submitted. ``run.dir`` is fixed once,
as an absolute path, and the resolved config is written there; every attempt of the job (first
start, requeue after USR2, restart after a node failure) reads it from there and resumes from the
newest checkpoint in it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import submitit
from omegaconf import DictConfig, OmegaConf

from launch.requeue import attempt, failures, job_key, record_end, remember_runs, requeues_after_failures
from pipeline.checkpoint import atomic_write_bytes, checkpoint_dir, read_pointer
from pipeline.cli import command
from pipeline.config import ConfigError, global_batch, load_config, to_yaml
from pipeline.lock import RunDirLock, RunDirLocked, holds_files
from pipeline.train import per_rank_batch

JOB_FILE = "slurm/job.json"  # in run.dir: job id, logs, MLflow link; read by `status` and `cancel`
CONFIG_FILE = "config.yaml"  # in run.dir: the resolved config every attempt of the job reads
REQUEUE_SIGNALS = ("SIGUSR1", "SIGUSR2")  # SLURM's time-limit warning and submitit's preemption signal


class LaunchError(RuntimeError):
    """A problem found before submitting, with a message meant for the person submitting."""


# ---------------------------------------------------------------- checks on the login node

_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def time_minutes(text: str) -> int:
    """A SLURM time limit in whole minutes (rounded up): M, M:S, H:M:S, D-H, D-H:M or D-H:M:S."""
    text = str(text).strip()
    match = _TIME.match(text)
    if not match:
        raise LaunchError(f"'slurm.time_min' is {text!r}, not a SLURM time. Use minutes (90) or "
                          "MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS (e.g. 2-00:00:00).")
    days, a, b, c = match.groups()
    fields = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:  # D-H, D-H:M, D-H:M:S
        h, m, s = (fields + [0, 0])[:3]
        seconds = ((int(days) * 24 + h) * 60 + m) * 60 + s
        minor = fields[1:]
    elif len(fields) == 3:  # H:M:S
        seconds, minor = (fields[0] * 60 + fields[1]) * 60 + fields[2], fields[1:]
    else:  # M or M:S
        seconds, minor = fields[0] * 60 + (fields[1] if len(fields) > 1 else 0), fields[1:]
    if any(x >= 60 for x in minor) or seconds <= 0:
        raise LaunchError(f"'slurm.time_min' is {text!r}: minutes and seconds go up to 59 and the limit must be "
                          "longer than 0.")
    return -(-seconds // 60)


def tasks_per_node(cfg: DictConfig) -> int:
    return cfg.slurm.tasks_per_node or cfg.slurm.gpus_per_node or 1


def check_job(cfg: DictConfig) -> int:
    """The checks that need no cluster; returns the time limit in minutes."""
    s = cfg.slurm
    if s.gpus_per_node and s.tasks_per_node not in (0, s.gpus_per_node):
        raise LaunchError(f"'slurm.tasks_per_node' is {s.tasks_per_node} with slurm.gpus_per_node="
                          f"{s.gpus_per_node}: one task runs per GPU. Leave tasks_per_node at 0.")
    world = s.nodes * tasks_per_node(cfg)
    try:
        per_rank_batch(global_batch(cfg.train, world), world)
    except ConfigError as err:
        raise LaunchError(f"{err} (slurm.nodes={s.nodes} x {tasks_per_node(cfg)} tasks per node)") from None
    minutes = time_minutes(s.time_min)
    if s.signal_delay_s >= minutes * 60:
        raise LaunchError(f"'slurm.signal_delay_s' ({s.signal_delay_s}) must be shorter than the time limit "
                          f"({minutes} min): the job checkpoints that long before SLURM stops it.")
    if cfg.data.backend != "synthetic" and cfg.data.workers > s.cpus_per_task:
        raise LaunchError(f"'data.workers' ({cfg.data.workers}) is more than 'slurm.cpus_per_task' "
                          f"({s.cpus_per_task}): the loader would fight over the task's cores. Raise "
                          "slurm.cpus_per_task or lower data.workers.")
    if bool(s.container_mounts) and not s.container_image:
        raise LaunchError("'slurm.container_mounts' is set without 'slurm.container_image'.")
    return minutes


def _run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=60, env=clean_environment())


def cluster_says(command: list[str]) -> str:
    """The output of a query that must answer before anything is submitted; if it fails, so does the submission."""
    try:
        result = _run(command)
        error = None if result.returncode == 0 else f"exit status {result.returncode}: {result.stderr.strip() or '-'}"
    except (OSError, subprocess.TimeoutExpired) as err:
        error = str(err)
    if error:
        raise LaunchError(f"`{shlex.join(command)}` failed ({error}). Nothing was submitted: the checks before a "
                          "submission need the SLURM controller to answer. See whether it does (`scontrol ping`; "
                          f"SLURM_CONF={os.environ.get('SLURM_CONF', '(unset: the default slurm.conf)')}), then "
                          "submit again.")
    return result.stdout


def check_cluster(cfg: DictConfig) -> None:
    """The checks that ask the cluster: its tools are here, and it knows the partition and account."""
    missing = [tool for tool in ("sbatch", "squeue", "scontrol", "sinfo") if shutil.which(tool) is None]
    if missing:
        raise LaunchError(f"{', '.join(missing)} not found on PATH: run this on a SLURM login node (or load the "
                          "cluster's slurm module). Use --dry-run to see the job script without submitting.")
    s = cfg.slurm
    image = s.container_image
    if s.container_runtime == "apptainer" and image and "://" not in image and not Path(image).exists():
        raise LaunchError(f"'slurm.container_image' {image} does not exist. Build it on a shared filesystem with "
                          "`apptainer build densenet-pipeline.sif docker/apptainer.def` (docker/README.md) and set "
                          "its path, or use a docker:// or oras:// URI.")
    if s.partition:
        known = sorted(set(cluster_says(["sinfo", "-h", "-o", "%R"]).split()))
        if s.partition not in known:
            raise LaunchError(f"Unknown partition 'slurm.partition={s.partition}'. This cluster has: "
                              f"{', '.join(known)}.")
    if s.account and shutil.which("sacctmgr"):
        user = os.environ.get("USER") or os.environ.get("LOGNAME") or ""
        result = _run(["sacctmgr", "-n", "-P", "show", "associations", f"user={user}", "format=account"])
        accounts = sorted({line.strip() for line in result.stdout.splitlines() if line.strip()})
        if result.returncode == 0 and accounts and s.account not in accounts:
            raise LaunchError(f"Unknown account 'slurm.account={s.account}' for user {user}. Your accounts: "
                              f"{', '.join(accounts)}.")
    check_fit(cfg, partition_nodes(s.partition))


def partition_nodes(partition: str) -> list[dict]:
    """The nodes of ``partition`` (the default one if empty): name, CPUs, memory (MB), GPUs."""
    nodes = {}
    for line in cluster_says(["sinfo", "-h", "-N", "-o", "%N|%P|%c|%m|%G"]).splitlines():
        name, part, cpus, memory, gres = (line.split("|") + [""] * 5)[:5]
        default = part.endswith("*")
        if (part.rstrip("*") in partition.split(",")) if partition else default:  # "a,b": either partition
            gpus = sum(int(n) for n in re.findall(r"gpu(?::[\w.-]+)?:(\d+)", gres))
            nodes[name] = {"name": name, "cpus": int(cpus or 0), "mem_mb": int(memory.rstrip("+") or 0),
                           "gpus": gpus}
    return list(nodes.values())


def check_fit(cfg: DictConfig, nodes: list[dict]) -> None:
    """Refuse a request that no node (or too few nodes) of the partition can hold: SLURM would accept it and
    leave it pending for ever (Reason=PartitionConfig)."""
    s = cfg.slurm
    if not nodes:
        return
    tasks = tasks_per_node(cfg)
    need = {"cpus": tasks * s.cpus_per_task, "gpus": s.gpus_per_node, "mem_mb": s.mem_gb * 1024}
    fits = [n for n in nodes if all(n[k] >= v for k, v in need.items())]
    if len(fits) >= s.nodes:
        return
    where = f"partition '{s.partition}'" if s.partition else "the default partition"
    most = {k: max(n[k] for n in nodes) for k in need}
    asked = (f"{s.nodes} node(s), each with {tasks} task(s) x {s.cpus_per_task} CPU(s) = {need['cpus']} CPUs, "
             f"{need['gpus']} GPU(s)" + (f", {s.mem_gb} GB" if s.mem_gb else ""))
    has = (f"{len(nodes)} node(s), {len(fits)} of which can hold that; the largest has {most['cpus']} CPUs, "
           f"{most['gpus']} GPU(s), {most['mem_mb'] // 1024} GB")
    raise LaunchError(f"The job asks for {asked}; {where} has {has}. SLURM would queue it for ever. Lower "
                      "slurm.cpus_per_task, slurm.tasks_per_node, slurm.gpus_per_node, slurm.mem_gb or "
                      "slurm.nodes, or choose another slurm.partition.")


ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
          "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT"}


def check_run_dirs_free(cfgs: list[DictConfig]) -> None:
    """Refuse to submit into a run dir that a run holds (its lock) or whose job (from its job.json) is still
    queued or running; one squeue call for all of them. Nothing is written before this passes."""
    jobs: dict[str, str] = {}  # job id -> run dir
    for cfg in cfgs:
        run_dir = Path(cfg.run.dir)
        if not run_dir.is_dir():
            continue
        try:
            RunDirLock(run_dir).acquire(grace_s=0).release()
        except RunDirLocked as err:
            raise LaunchError(str(err)) from None
        except OSError:
            pass  # a lock that cannot be tried here is tried again by the job's rank 0
        try:
            jobs[str(json.loads((run_dir / JOB_FILE).read_text())["job_id"])] = str(run_dir)
        except (OSError, ValueError, KeyError):
            continue
    if not jobs:
        return
    bases = sorted({job.split("_")[0] for job in jobs})  # an array's id lists all its tasks
    result = _run(["squeue", "-h", "-j", ",".join(bases), "-o", "%i|%T"])
    if result.returncode != 0 and "Invalid job id" not in result.stderr:
        raise LaunchError(f"squeue could not tell whether job(s) {', '.join(jobs)} still run "
                          f"({result.stderr.strip() or result.returncode}): not submitting into their run dirs "
                          "while that is unknown; nothing was submitted. See whether the controller answers "
                          "(`scontrol ping`), then submit again.")
    for line in result.stdout.splitlines() if result.returncode == 0 else []:
        listed, _, state = line.partition("|")  # 12, 12_3, or 12_[4-7] for an array's tasks still pending
        mine = [job for job in jobs if job == listed or ("[" in listed and job.split("_")[0] == listed.split("_")[0])]
        if state in ACTIVE and mine:
            job, run_dir = mine[0], jobs[mine[0]]
            raise LaunchError(f"run.dir='{run_dir}' belongs to job {job}, which is {state}: a second job would "
                              "train into the same checkpoints. Wait for it (python -m launch.slurm status "
                              f"{run_dir}), cancel it (python -m launch.slurm cancel {run_dir}), or choose "
                              "another run.dir.")


def check_tracking_store(cfgs: list[DictConfig]) -> None:
    """Refuse a sweep whose jobs would all write one SQLite store on a network filesystem; warn for one job."""
    from pipeline.tracking import shared_sqlite_problem, tracking_uri

    if cfgs[0].tracking.backend != "mlflow":
        return
    problem = shared_sqlite_problem(tracking_uri(cfgs[0]), len(cfgs))
    if problem and len(cfgs) > 1:
        raise LaunchError(problem)
    if problem:
        print(f"warning: {problem} One job alone is safe only while no other job writes the same store.",
              file=sys.stderr)


def clean_environment() -> dict[str, str]:
    """This environment without the job and distributed variables of an enclosing job (SLURM_CONF stays:
    it says where the cluster's configuration is, not which job this is)."""
    drop = ("SLURM_", "SLURMD_", "SBATCH_", "SRUN_", "SUBMITIT_")
    dist = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    return {k: v for k, v in os.environ.items() if k == "SLURM_CONF" or not (k.startswith(drop) or k in dist)}


@contextmanager
def clean_env():
    """Submit with :func:`clean_environment`: a job submitted from inside a job must not inherit its SLURM_*."""
    saved, clean = os.environ.copy(), clean_environment()
    os.environ.clear()
    os.environ.update(clean)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


# ---------------------------------------------------------------- the job script

def sbatch_parameters(cfg: DictConfig, minutes: int, folder: Path) -> dict:
    """submitit's SlurmExecutor parameters for ``cfg.slurm`` (mem in GB, as submitit takes it).

    The first task that fails ends the step (``srun --kill-on-bad-exit=1``): no rank waits in a collective for
    a dead one. The job script then asks :mod:`launch.requeue` whether to requeue (``folder``: submitit's)."""
    s = cfg.slurm
    params = {
        "job_name": s.job_name or Path(cfg.run.dir).name,
        "nodes": s.nodes,
        "ntasks_per_node": tasks_per_node(cfg),
        "cpus_per_task": s.cpus_per_task,
        "time": minutes,
        "signal_delay_s": s.signal_delay_s,
        "array_parallelism": s.array_parallelism,
        "stderr_to_stdout": False,
    }
    optional = {"partition": s.partition, "account": s.account, "qos": s.qos, "constraint": s.constraint,
                "mem": s.mem_gb, "exclusive": s.exclusive or None}
    if s.gpus_per_node and s.gpu_binding == "task":
        optional["gpus_per_task"] = 1  # each task sees its own GPU, as device 0
    else:
        optional["gpus_per_node"] = s.gpus_per_node
    params.update({k: v for k, v in optional.items() if v})
    if s.setup:  # a `set -e` there would end the script with a failed step, before it can requeue the job
        params["setup"] = [*s.setup, "set +e"]
    if s.additional:
        params["additional_parameters"] = OmegaConf.to_container(s.additional)
    container = []
    if s.container_image and s.container_runtime == "pyxis":
        container = [f"--container-image={s.container_image}"] + (
            [f"--container-mounts={s.container_mounts}"] if s.container_mounts else [])
    params["srun_args"] = ["--kill-on-bad-exit=1", *container]
    # on the batch host, after the step: requeue after a fault (pyxis: in the image, as one more step)
    decide = shlex.join(["srun", "--nodes=1", "--ntasks=1", *container]) + " " if container else ""
    params["teardown"] = ["srun_status=$?",
                          f'if [ "$srun_status" -ne 0 ]; then {decide}{job_python(cfg)} -m launch.requeue '
                          f'{shlex.quote(str(folder))} "$srun_status"; fi',
                          'exit "$srun_status"']
    return params


def job_python(cfg: DictConfig) -> str:
    """The interpreter the tasks run: this one, the pyxis container's ``python``, or ``apptainer exec``'s."""
    s = cfg.slurm
    if not s.container_image:
        return shlex.quote(sys.executable)
    if s.container_runtime == "pyxis":
        return "python"
    words = ["apptainer", "exec", "--nv"]  # --nv on a node without GPUs only warns
    words += ["--bind", s.container_mounts] if s.container_mounts else []
    return shlex.join([*words, s.container_image, "python"])


def sbatch_script(cfg: DictConfig, folder: Path, minutes: int, array_size: int | None = None) -> str:
    """The sbatch script submitit would write for ``cfg``, for --dry-run."""
    from submitit.slurm.slurm import _make_sbatch_string

    params = sbatch_parameters(cfg, minutes, folder)
    if "mem" in params:
        params["mem"] = f"{params['mem']}GB"
    command = f"{job_python(cfg)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    return _make_sbatch_string(command=command, folder=folder, map_count=array_size, **params)


# ---------------------------------------------------------------- what runs in each task

class Training(submitit.helpers.Checkpointable):
    """One task of the job: the torch.distributed environment from SLURM, then ``train.main``.

    Holds only the run dir: every attempt reads the config written there at submission and resumes
    from the newest checkpoint in it, never from state pickled at submit time.
    """

    def __init__(self, run_dir: str):
        self.run_dir = run_dir

    def __call__(self) -> dict:
        from pipeline.boundary import NONFINITE_EXIT_CODE, NonFiniteLoss
        from pipeline.checkpoint import RESUME_EXIT_CODE
        from pipeline.signals import StopRequested
        from pipeline.train import REFUSALS, main

        job = submitit.JobEnvironment()
        # MASTER_ADDR: the first host; MASTER_PORT: from the job id; RANK, WORLD_SIZE, LOCAL_RANK
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        run_dir = Path(self.run_dir)
        cfg = load_config(run_dir / CONFIG_FILE, profiles=False)
        if cfg.run.resume == "never" or read_pointer(run_dir):
            cfg = OmegaConf.merge(cfg, {"run": {"resume": "auto"}})
        restarts = attempt()
        print(f"job {job.job_id}, task {job.global_rank} of {job.num_tasks}, attempt {restarts + 1}, host "
              f"{socket.gethostname()}, run dir {run_dir}", flush=True)
        if job.global_rank == 0 and shutil.which("scontrol") is None:
            print("Warning: scontrol is not on PATH here (a container without SLURM's tools?): a time limit or "
                  "preemption will checkpoint but cannot requeue the job; resubmit to resume, or make scontrol "
                  "available in the image (docker/README.md).", flush=True)
        main_task = job.global_rank == 0
        timeouts = restarts - requeues_after_failures(run_dir, job_key())  # time limits and preemptions
        can_requeue = shutil.which("scontrol") is not None

        def outcome(err: BaseException | None, dist) -> None:
            """Record an end on purpose (not a fault) before any rank exits, so the job script does not requeue
            it: rank 0 for what every rank agreed on, a rank alone for its own refusal."""
            why = None
            if err is None and dist.is_main:
                why = (0, "finished")
            elif isinstance(err, StopRequested) and dist.is_main:
                if err.signal not in REQUEUE_SIGNALS:
                    why = (RESUME_EXIT_CODE, f"stopped by {err.signal or 'a signal'}")
                elif timeouts >= cfg.slurm.max_requeues:
                    why = (1, f"slurm.max_requeues={cfg.slurm.max_requeues} reached")
                else:
                    why = (RESUME_EXIT_CODE, f"requeued by rank 0 after {err.signal}" if can_requeue else
                           "not requeued: no scontrol")
            elif isinstance(err, (*REFUSALS, NonFiniteLoss)) and (dist.is_main or not getattr(err, "on_every_rank",
                                                                                               False)):
                code = NONFINITE_EXIT_CODE if isinstance(err, NonFiniteLoss) else 2
                why = (code, f"{type(err).__name__}: {str(err).splitlines()[0][:300]}")
            if why:
                record_end(run_dir, *why)

        try:
            summary = main(cfg, on_end=outcome)
        except StopRequested as stop:
            if stop.signal not in REQUEUE_SIGNALS:
                # scancel, or a preemption that SLURM itself requeues: the checkpoint is on disk, stop here
                print(f"Stopped by {stop.signal or 'a signal'} after checkpointing; resubmit the same command "
                      f"to resume from {run_dir}.", flush=True)
                sys.exit(RESUME_EXIT_CODE)
            if main_task:
                if timeouts >= cfg.slurm.max_requeues:
                    raise RuntimeError(
                        f"Not requeued: the job was already requeued {timeouts} times after a time limit or a "
                        f"preemption (slurm.max_requeues={cfg.slurm.max_requeues}). The checkpoint is in "
                        f"{run_dir}: submit again with the same run.dir (or raise slurm.max_requeues) to go "
                        "on.") from None
                if not can_requeue:
                    print(f"Not requeued: scontrol is not on PATH in this task. The checkpoint is in {run_dir}: "
                          "submit the same command again to resume.", flush=True)
                    sys.exit(RESUME_EXIT_CODE)
                print(f"Checkpointed after {stop.signal}; requeueing the job: SLURM starts it again and it resumes "
                      f"from {run_dir} by itself (nothing to run; python -m launch.slurm status {run_dir}).",
                      flush=True)
                # submitit's own handler (back in place since main returned) calls checkpoint(), requeues and exits
                signal.raise_signal(submitit.JobEnvironment._usr_sig())
            return {}
        # a late time-limit signal must not requeue a finished job
        signal.signal(submitit.JobEnvironment._usr_sig(), signal.SIG_IGN)
        return summary

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        # the checkpoint itself was written by the training loop at the step the signal arrived
        return submitit.helpers.DelayedSubmission(Training(self.run_dir))


# ---------------------------------------------------------------- submitting

def sweep_points(sweeps: list[str]) -> list[list[str]]:
    """``['optim.lr=0.05,0.1', 'model.name=a,b']`` -> the cartesian product as lists of key=value words."""
    axes = []
    for sweep in sweeps:
        key, sep, values = sweep.partition("=")
        items = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not items:
            raise LaunchError(f"--sweep {sweep!r} is not KEY=V1,V2,... (for example --sweep optim.lr=0.05,0.1).")
        axes.append([f"{key.strip()}={v}" for v in items])
    return [list(words) for words in itertools.product(*axes)]


def point_name(words: list[str]) -> str:
    """A folder name for one sweep point: ``optim.lr=0.05 model.name=x`` -> ``lr-0.05_name-x``."""
    parts = []
    for word in words:
        key, _, value = word.partition("=")
        parts.append(f"{key.rsplit('.', 1)[-1]}-{value}")
    return re.sub(r"[^A-Za-z0-9._+-]", "_", "_".join(parts))


def resolve_runs(config: str, overrides: list[str], sweeps: list[str]) -> list[DictConfig]:
    """One validated config per job (one, or one per sweep point), each with its absolute run.dir."""
    base = load_config(config, overrides)
    root = Path(base.run.dir).absolute()
    points = sweep_points(sweeps) if sweeps else [[]]
    cfgs = []
    for words in points:
        run_dir = root / point_name(words) if words else root
        cfg = load_config(config, [*overrides, *words, f"run.dir={run_dir}"])
        if cfg.run.resume == "never" and holds_files(run_dir):
            raise LaunchError(f"run.dir='{run_dir}' already holds files and run.resume=never. Choose a new run.dir, "
                              "or set run.resume=auto to continue the run in it.")
        cfgs.append(cfg)
    return cfgs


def open_mlflow_run(cfg: DictConfig, run_dir: Path) -> tuple[str | None, str | None]:
    """Create (or reopen) the job's MLflow run now, so its link can be shown. Returns (link, the id of a run created
    here: to delete if the submission fails); (None, None) without tracking."""
    if cfg.tracking.backend != "mlflow":
        return None, None
    from pipeline.tracking import connect, open_run, run_link, tracking_uri, unreachable

    uri = tracking_uri(cfg)
    try:
        run_id, reopened = open_run(connect(uri), cfg, run_dir, uri, status="SCHEDULED")
    except Exception as err:
        message = unreachable(uri, err)
        if cfg.tracking.required:
            raise LaunchError(message + ".") from None
        print(f"warning: {message}; the job will try again when it starts.", file=sys.stderr)
        return None, None
    return run_link(uri, run_dir), None if reopened else run_id


# submitit's files for a job not yet accepted: its pickled call and its sbatch script (submitit/core/core.py)
SUBMITIT_TEMPORARY = re.compile(r"[0-9a-f]{32}\.pkl|\.submission_file_[0-9a-f]{32}\.sh")


class Undo:
    """What a submission wrote before sbatch accepted it, to take back if it did not, and nothing else: a live job
    in the same folders (a sweep's other points, a run dir's earlier job) may write beside it meanwhile. A folder it
    created goes whole. In a run dir that existed, ``config.yaml`` gets its old content back (or goes, if new), and
    ``mlflow_run.json`` and the lock test's ``run.lock`` go if new; in a job folder that existed, submitit's
    temporary files go. The MLflow runs created for it are deleted."""

    def __init__(self, run_dirs: list[Path], job_folder: Path):
        from pipeline.lock import LOCK_FILE
        from pipeline.tracking import RUN_ID_FILE

        self.new = [f for f in dict.fromkeys([*run_dirs, job_folder.parent, job_folder]) if not f.exists()]
        self.kept = [d for d in run_dirs if d.is_dir()]
        self.configs = {d: (d / CONFIG_FILE).read_bytes() if (d / CONFIG_FILE).is_file() else None for d in self.kept}
        self.absent = [d / name for d in self.kept for name in (RUN_ID_FILE, LOCK_FILE) if not (d / name).exists()]
        self.job_folder = job_folder
        self.job_files = set(job_folder.iterdir()) if job_folder.is_dir() else None
        self.runs: list[tuple[DictConfig, str]] = []  # MLflow runs created here: (config, run id)

    def __call__(self) -> str:
        """Take it all back; says what was done (and what could not be), as sentences."""
        said = []
        for cfg, run_id in self.runs:
            from pipeline.tracking import connect, redact, tracking_uri

            try:
                connect(tracking_uri(cfg)).delete_run(run_id)
                said.append(f"MLflow run {run_id} deleted.")
            except Exception as err:  # noqa: BLE001 - the others are still undone; this one is named
                said.append(f"MLflow run {run_id} could not be deleted ({redact(str(err))[:200]}): delete it in the "
                            "UI.")
        for folder in self.new:
            if folder.exists():
                shutil.rmtree(folder, ignore_errors=True)
                said.append(f"{folder} removed." if not folder.exists() else f"{folder} could not be removed.")
        for path in self.absent:
            path.unlink(missing_ok=True)
        for folder, config in self.configs.items():
            if config is None:
                (folder / CONFIG_FILE).unlink(missing_ok=True)
            else:
                atomic_write_bytes(folder / CONFIG_FILE, config)
            said.append(f"{folder} holds what it held before.")
        if self.job_files is not None:
            for path in set(self.job_folder.iterdir()) - self.job_files:
                if SUBMITIT_TEMPORARY.fullmatch(path.name):
                    path.unlink(missing_ok=True)
        return " ".join(said)


def job_folder(cfgs: list[DictConfig]) -> Path:
    """submitit's folder: the run dir's ``slurm/``, or for a sweep the one beside the points' run dirs."""
    return Path(cfgs[0].run.dir) / "slurm" if len(cfgs) == 1 else Path(cfgs[0].run.dir).parent / "slurm"


def submit(cfgs: list[DictConfig], minutes: int) -> list[dict]:
    """Check the run dirs are free, write each one's config, create the MLflow runs, submit one job (or one array);
    returns job records. If anything fails before sbatch accepts the job, nothing is left behind (:class:`Undo`)."""
    folder = job_folder(cfgs)
    undo = Undo([Path(cfg.run.dir) for cfg in cfgs], folder)
    links, submitting = [], False
    try:
        check_run_dirs_free(cfgs)  # its lock test leaves a lock file in a run dir: taken back with the rest
        check_tracking_store(cfgs)
        for cfg in cfgs:
            run_dir = Path(cfg.run.dir)
            (run_dir / "slurm").mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(run_dir / CONFIG_FILE, to_yaml(cfg).encode())
            link, created = open_mlflow_run(cfg, run_dir)
            links.append(link)
            if created:
                undo.runs.append((cfg, created))
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=cfgs[0].slurm.max_requeues,
                                          python=job_python(cfgs[0]))
        executor.update_parameters(**sbatch_parameters(cfgs[0], minutes, folder))
        submitting = True  # from here on sbatch may have accepted the job
        with clean_env():
            if len(cfgs) == 1:
                jobs = [executor.submit(Training(cfgs[0].run.dir))]
            else:
                with executor.batch():
                    jobs = [executor.submit(Training(cfg.run.dir)) for cfg in cfgs]
    except submitit.core.utils.FailedJobError as err:
        raise LaunchError(f"sbatch refused the job: {str(err).strip()} Undone: {undo()}") from None
    except LaunchError as err:
        raise LaunchError(f"{err} Undone: {undo()}") from None
    except BaseException as err:
        if submitting and isinstance(err, KeyboardInterrupt):  # the job may be queued: its files must stay
            print(f"Interrupted while sbatch was submitting: the job may be queued. See squeue --me; its files in "
                  f"{folder} and the run dir(s) are kept.", file=sys.stderr)
        else:
            undo()
        raise
    remember_runs(folder, {job.job_id: cfg.run.dir for cfg, job in zip(cfgs, jobs, strict=True)})
    records = []
    for cfg, job, link in zip(cfgs, jobs, links, strict=True):
        run_dir = Path(cfg.run.dir)
        record = {"job_id": job.job_id, "run_dir": str(run_dir), "submitted": datetime.now(timezone.utc).isoformat(),
                  "stdout": str(job.paths.stdout).replace("%t", "0"),
                  "stderr": str(job.paths.stderr).replace("%t", "0"),
                  "train_log": str(run_dir / "train.log"), "mlflow": link,
                  "tasks": cfg.slurm.nodes * tasks_per_node(cfg)}
        atomic_write_bytes(run_dir / JOB_FILE, json.dumps(record, indent=1).encode())
        records.append(record)
    return records


# ---------------------------------------------------------------- status and cancel

def read_job(run_dir: str | Path) -> dict:
    path = Path(run_dir).absolute() / JOB_FILE
    if not path.is_file():
        raise LaunchError(f"{path} does not exist: '{run_dir}' is not the run dir of a job submitted with "
                          "python -m launch.slurm.")
    return json.loads(path.read_text())


def job_state(job_id: str) -> dict[str, str]:
    """State, restarts and reason from the controller (scontrol), falling back to squeue and sacct."""
    result = _run(["scontrol", "show", "job", "-o", job_id])
    if result.returncode == 0 and result.stdout.strip():
        fields = dict(re.findall(r"(\w+)=(\S*)", result.stdout.splitlines()[0]))
        return {"state": fields.get("JobState", "?"), "restarts": fields.get("Restarts", "?"),
                "reason": fields.get("Reason", ""), "nodes": fields.get("NodeList", "")}
    if shutil.which("sacct"):
        result = _run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State,Restarts"])
        if result.returncode == 0 and result.stdout.strip():
            state, _, restarts = result.stdout.splitlines()[0].partition("|")
            return {"state": state, "restarts": restarts or "?", "reason": "", "nodes": ""}
    return {"state": "UNKNOWN (no longer known to the controller; see the logs)", "restarts": "?", "reason": "",
            "nodes": ""}


def _tail(path: Path, lines: int) -> list[str]:
    if not path.is_file():
        return []
    return path.read_text(errors="replace").splitlines()[-lines:]


def status(run_dir: str | Path, lines: int = 10) -> str:
    record = read_job(run_dir)
    run_dir = Path(record["run_dir"])
    state = job_state(record["job_id"])
    out = [f"job {record['job_id']}: {state['state']}"
           + (f" ({state['reason']})" if state["reason"] not in ("", "None") else "")
           + f", restarts {state['restarts']}" + (f", nodes {state['nodes']}" if state["nodes"] else ""),
           f"run dir    {run_dir}"]
    events = [json.loads(line) for line in _tail(run_dir / "metrics.jsonl", 50) if line.strip()]
    progress = [e for e in events if "global_step" in e]
    if progress:
        last = progress[-1]
        out.append(f"progress   epoch {last.get('epoch', 0) + 1}, global step {last['global_step']} "
                   f"(last {last['event']} record)")
    faults = [f for f in failures(run_dir) if f["job"] == record["job_id"]]
    if faults:
        last = faults[-1]
        out.append(f"failures   {len(faults)} (counted {last['count']} of slurm.max_failures); the last: attempt "
                   f"{last['attempt']}, srun exit status {last['status']} at checkpoint step {last['step']}, "
                   f"{'requeued' if last['requeued'] else 'NOT requeued'}")
    newest = read_pointer(run_dir)
    if newest:
        out.append(f"checkpoint {checkpoint_dir(run_dir) / newest['file']} (global step {newest['global_step']})")
    else:
        out.append("checkpoint none yet")
    if record.get("mlflow"):
        out.append(f"mlflow     {record['mlflow']}")
    log = Path(record["train_log"])
    if not log.is_file():
        log = Path(record["stderr"].replace("%j", record["job_id"]))
    out.append(f"log        {log}")
    out += [f"  {line}" for line in _tail(log, lines)]
    return "\n".join(out)


def cancel(run_dir: str | Path) -> str:
    record = read_job(run_dir)
    if shutil.which("scancel") is None:
        raise LaunchError("scancel not found on PATH: run this on a SLURM login node.")
    result = _run(["scancel", record["job_id"]])
    if result.returncode != 0:
        raise LaunchError(f"scancel {record['job_id']} failed: {result.stderr.strip()}")
    return (f"cancelled job {record['job_id']}; its checkpoints stay in {record['run_dir']}: submit the same command "
            "again to resume.")


# pending reasons that no amount of waiting resolves: the request itself must change
NEVER_RESOLVES = {
    "PartitionConfig": "the request exceeds what the partition's nodes or limits allow",
    "PartitionNodeLimit": "more nodes than the partition allows a job",
    "PartitionTimeLimit": "slurm.time_min is above the partition's time limit",
    "BadConstraints": "no node has the features slurm.constraint asks for",
    "InvalidAccount": "the account is not valid for this user or partition",
    "InvalidQOS": "the QOS is not valid for this account",
    "AccountNotAllowed": "the account may not use this partition",
    "QOSNotAllowed": "the QOS may not be used in this partition",
    "DependencyNeverSatisfied": "a dependency can never be met",
    "JobHeldAdmin": "an administrator holds the job",
}


def wait(records: list[dict], poll_s: float = 5.0) -> int:
    """Poll until every job has left the queue, printing each change of its state and pending reason;
    stops at a reason that never resolves. 0 if each run wrote summary.json."""
    pending = {r["job_id"] for r in records}
    shown: dict[str, str] = {}
    while pending:
        for job_id in sorted(pending):
            result = _run(["squeue", "-h", "-j", job_id, "-o", "%T|%r"])
            if result.returncode != 0 or not result.stdout.strip():
                pending.discard(job_id)
                continue
            states = sorted({tuple(line.partition("|")[::2]) for line in result.stdout.splitlines() if line})
            said = ", ".join(f"{state} ({reason})" if state == "PENDING" and reason not in ("", "None") else state
                             for state, reason in states)  # an array has a line per task
            if said != shown.get(job_id):
                print(f"{job_id}: {said}", flush=True)
                shown[job_id] = said
            stuck = [reason for state, reason in states if state == "PENDING" and reason in NEVER_RESOLVES]
            if stuck:
                print(f"{job_id} cannot start: Reason={stuck[0]}, {NEVER_RESOLVES[stuck[0]]}. It stays queued "
                      f"until you cancel it (scancel {job_id}); change the request and submit again.", flush=True)
                return 1
        if pending:
            time.sleep(poll_s)
    failed = 0
    for record in records:
        summary = Path(record["run_dir"]) / "summary.json"
        if summary.is_file():
            print(f"{record['job_id']}: {summary.read_text().strip()}")
        else:
            failed += 1
            print(f"{record['job_id']}: no summary.json; see python -m launch.slurm status {record['run_dir']}")
    return 1 if failed else 0


# ---------------------------------------------------------------- command line

def parse_args(argv: list[str]) -> argparse.Namespace:
    if argv and argv[0] in ("status", "cancel"):
        parser = argparse.ArgumentParser(prog=f"python -m launch.slurm {argv[0]}")
        parser.add_argument("run_dir", help="the run dir the job was submitted with")
        parser.add_argument("--lines", type=int, default=10, help="how many log lines to show (status)")
        args = parser.parse_args(argv[1:])
        args.command = argv[0]
        return args
    parser = argparse.ArgumentParser(prog="python -m launch.slurm", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML recipe, e.g. configs/densenet121.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value words, e.g. slurm.profile=gpu-8 slurm.nodes=4")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch script; submit nothing")
    parser.add_argument("--wait", action="store_true", help="wait for the job(s) to end")
    parser.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                        help="one job array over the cartesian product of all --sweep options")
    args = parser.parse_intermixed_args(argv)
    args.command = "submit"
    return args


@command(LaunchError)
def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.command == "status":
        print(status(args.run_dir, args.lines))
        return 0
    if args.command == "cancel":
        print(cancel(args.run_dir))
        return 0
    cfgs = resolve_runs(args.config, args.overrides, args.sweep)
    minutes = check_job(cfgs[0])
    if args.dry_run:
        print(sbatch_script(cfgs[0], job_folder(cfgs), minutes, len(cfgs) if len(cfgs) > 1 else None))
        for cfg in cfgs:
            print(f"# run dir: {cfg.run.dir}", file=sys.stderr)
        return 0
    check_cluster(cfgs[0])
    records = submit(cfgs, minutes)
    for record in records:
        print(f"submitted job {record['job_id']} ({record['tasks']} tasks)")
        print(f"  run dir  {record['run_dir']}")
        print(f"  logs     {record['stdout'].replace('%j', record['job_id'])}")
        print(f"           {record['stderr'].replace('%j', record['job_id'])}")
        print(f"           {record['train_log']} (once training starts)")
        if record["mlflow"]:
            print(f"  mlflow   {record['mlflow']}")
        print(f"  status   python -m launch.slurm status {record['run_dir']}")
    return wait(records) if args.wait else 0


if __name__ == "__main__":
    sys.exit(main())
