"""The SLURM launcher against a real SLURM cluster of two nodes (tests/slurm/cluster.sh), with CPU ranks on gloo:
each node is a slurmd in its own network namespace, so ranks on different nodes meet over the nodes' addresses."""

import json
import os
import re
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from launch.slurm import LaunchError, Undo, time_minutes

ROOT = Path(__file__).resolve().parents[2]
MINI = str(ROOT / "configs/mini.yaml")


def launch(*words, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "launch.slurm", *words], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def job_words(run_dir, data, *extra):
    return [MINI, "slurm.profile=cpu-test", f"run.dir={run_dir}", f"data.root={data}", "train.epochs=1",
            "train.log_every_steps=1", "tracking.backend=none", *extra]


# random tensors instead of JPEGs, for the tests about the job rather than the run
SYNTHETIC = ("data.backend=synthetic", "data.synthetic_steps=40", "train.batch_size=8", "data.val_batch_size=8")


def submitted_id(result) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return re.search(r"submitted job (\S+)", result.stdout).group(1)


def queue() -> list[str]:
    return subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True).stdout.split()


def job_logs(run_dir: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-2500:]}" for p in sorted((run_dir / "slurm").glob("*_log.*")))


def wait_done(job_id: str, run_dir: Path, timeout: float = 300) -> None:
    """Until the job has left the queue; its run dir must then hold summary.json."""
    deadline = time.monotonic() + timeout
    while subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip():
        assert time.monotonic() < deadline, f"job {job_id} still queued after {timeout}s\n" + job_logs(run_dir)
        time.sleep(1)
    assert (run_dir / "summary.json").is_file(), job_logs(run_dir)


def job_fields(job_id: str) -> list[dict[str, str]]:
    """``scontrol show job -o``, one dict per job (an array has one per task): what SLURM says the job held."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True)
    return [dict(word.split("=", 1) for word in line.split() if "=" in word) for line in out.stdout.splitlines()]


def task_hosts(run_dir: Path, job_id: str, tasks: int) -> list[str]:
    """The host each task says it ran on, in task order (the first attempt's line)."""
    return [re.search(rf"job {job_id}, task {t} of {tasks}, attempt \d+, host (\S+),",
                      (run_dir / f"slurm/{job_id}_{t}_log.out").read_text()).group(1) for t in range(tasks)]


def wait_for_step(run_dir: Path, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.is_file() and re.search(f'"global_step": {step}[,}}]', metrics.read_text())):
        assert time.monotonic() < deadline, f"step {step} not reached\n" + job_logs(run_dir)
        time.sleep(0.2)


@pytest.fixture(scope="module")
def reference(slurm, tmp_path_factory, mini_data):
    """An uninterrupted 2-rank job: the run every interrupted one must reproduce bit for bit."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = launch(*job_words(run_dir, mini_data))
    job_id = submitted_id(result)
    wait_done(job_id, run_dir)
    return run_dir, job_id, result.stdout


@pytest.fixture(scope="module")
def two_node_reference(slurm, tmp_path_factory, mini_data):
    """The same run as ``reference`` (world 2) as one task on each of two nodes, uninterrupted."""
    run_dir = tmp_path_factory.mktemp("two-nodes") / "run"
    job_id = submitted_id(launch(*job_words(run_dir, mini_data, "slurm.nodes=2", "slurm.tasks_per_node=1")))
    wait_done(job_id, run_dir)
    return run_dir, job_id


@pytest.mark.slow
def test_two_cpu_ranks_train_the_mini_config_and_report_where_everything_is(reference):
    run_dir, job_id, stdout = reference
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["replicas_identical"] and summary["epochs_completed"] == 1
    for shown in (str(run_dir), f"{run_dir}/slurm/{job_id}_0_log.out", f"launch.slurm status {run_dir}"):
        assert shown in stdout
    job = json.loads((run_dir / "slurm/job.json").read_text())
    assert job["job_id"] == job_id and job["tasks"] == 2
    # the ranks found each other from SLURM's variables alone
    out = (run_dir / f"slurm/{job_id}_1_log.out").read_text()
    assert f"job {job_id}, task 1 of 2, attempt 1, host node1," in out


@pytest.mark.slow
@pytest.mark.parametrize("tasks_per_node", [1, 2])
def test_a_two_node_job_trains_the_mini_config_with_ranks_meeting_across_the_nodes(
        request, reference, tmp_path, mini_data, tasks_per_node):
    if tasks_per_node == 1:
        run_dir, job_id = request.getfixturevalue("two_node_reference")
    else:
        run_dir = tmp_path / "run"
        job_id = submitted_id(launch(*job_words(run_dir, mini_data, "slurm.nodes=2", "slurm.tasks_per_node=2")))
        wait_for_step(run_dir, 3)
        status = launch("status", str(run_dir))
        assert f"job {job_id}: RUNNING, restarts 0" in status.stdout, status.stdout + status.stderr
        wait_done(job_id, run_dir)
    tasks = 2 * tasks_per_node
    # SLURM itself says the job held both nodes
    (job,) = job_fields(job_id)
    assert (job["JobState"], job["NumNodes"], job["NodeList"], job["NumTasks"]) == \
        ("COMPLETED", "2", "node[1-2]", str(tasks))
    # and each task ran where SLURM put it: the first tasks_per_node on node1, the rest on node2
    assert task_hosts(run_dir, job_id, tasks) == ["node1"] * tasks_per_node + ["node2"] * tasks_per_node
    ranks = "rank 0), node2 (rank 1)" if tasks_per_node == 1 else "ranks 0-1), node2 (ranks 2-3)"
    assert f"{tasks} ranks on 2 host(s): node1 ({ranks}; rendezvous node1:" in (run_dir / "train.log").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == tasks and summary["replicas_identical"] and summary["epochs_completed"] == 1
    if tasks_per_node == 1:
        # world 2 on two nodes trains exactly what world 2 on one node does
        assert (run_dir / "model_final.pt").read_bytes() == (reference[0] / "model_final.pt").read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("case", ["preemption", "time-out", "preemption on 2 nodes"])
def test_an_interrupted_job_requeues_resumes_and_ends_bitwise_identical(request, capsys, tmp_path, mini_data, case):
    run_dir = tmp_path / "run"
    two_nodes = case.endswith("2 nodes")
    reference = request.getfixturevalue("two_node_reference" if two_nodes else "reference")
    # submitit counts a USR2 as a time-out when the job ran past min(0.8 T, T - 10 min)
    limit = "5" if case == "time-out" else "30"
    tracking = ["tracking.backend=mlflow"] if case == "preemption" else []
    placement = ["slurm.nodes=2", "slurm.tasks_per_node=1"] if two_nodes else []
    result = launch(*job_words(run_dir, mini_data, f"slurm.time_min={limit}", *tracking, *placement))
    job_id = submitted_id(result)
    if tracking:
        assert "mlflow   run " in result.stdout  # the run exists (SCHEDULED) before the job starts
        run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    wait_for_step(run_dir, 7)
    status = launch("status", str(run_dir))
    assert f"job {job_id}: RUNNING, restarts 0" in status.stdout and "progress   epoch 1, global step" in status.stdout
    assert "INFO pipeline.train: epoch 1 step" in status.stdout
    signalled = time.time()
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)  # what submitit's job._interrupt() does
    wait_done(job_id, run_dir)

    err = (run_dir / f"slurm/{job_id}_0_log.err").read_text()
    assert f"this job is {'timed-out' if case == 'time-out' else 'preempted'}" in err
    if two_nodes:
        (job,) = job_fields(job_id)
        assert (job["JobState"], job["NumNodes"], job["Restarts"]) == ("COMPLETED", "2", "1")
        with capsys.disabled():
            report_interruption(run_dir, signalled, (run_dir / f"slurm/{job_id}_0_log.out").read_text())
    log = (run_dir / "train.log").read_text()
    assert "(stop signal SIGUSR2)" in log and "Resuming from" in log and "epoch 1, step" in log
    out = (run_dir / f"slurm/{job_id}_0_log.out").read_text()
    assert f"job {job_id}, task 0 of 2, attempt 2" in out
    assert f"requeueing the job: SLURM starts it again and it resumes from {run_dir} by itself" in out
    assert (run_dir / "model_final.pt").read_bytes() == (reference[0] / "model_final.pt").read_bytes()
    steps = [json.loads(line)["global_step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if '"event": "train"' in line]
    assert steps == sorted(set(steps)) and len(steps) == 20

    if tracking:
        from mlflow import MlflowClient

        client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        runs = client.search_runs([client.get_experiment_by_name("densenet").experiment_id])
        assert [r.info.run_id for r in runs] == [run_id] and runs[0].info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == list(range(1, 21))


def report_interruption(run_dir: Path, signalled: float, out: str) -> None:
    """Print the two figures of a preemption: signal -> stop checkpoint on disk, requeue -> first resumed step."""
    stop = re.search(r"Saved (step-\d+\.pt) \(stop signal SIGUSR2\)", (run_dir / "train.log").read_text()).group(1)
    in_run = re.search(r"Checkpoint on disk ([\d.]+)s after SIGUSR2", (run_dir / "train.log").read_text()).group(1)
    on_disk = (run_dir / "checkpoints" / stop).stat().st_mtime - signalled
    requeued = re.search(r"submitit \w+ \(([\d-]+ [\d:,]+)\) - Requeued job", out).group(1)
    requeued = datetime.strptime(requeued, "%Y-%m-%d %H:%M:%S,%f").timestamp()
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    resumed = next(e["time"] for e in events if e["event"] == "train" and e["time"] > requeued)
    started = re.findall(r"submitit INFO \(([\d-]+ [\d:,]+)\) - Starting with JobEnvironment", out)[-1]
    started = datetime.strptime(started, "%Y-%m-%d %H:%M:%S,%f").timestamp()
    print(f"\n2-node preemption: signal -> checkpoint on disk {on_disk:.2f}s (the run measured {in_run}s from "
          f"receiving it); requeue -> first resumed step {resumed - requeued:.1f}s (SLURM: requeue -> task start "
          f"{started - requeued:.1f}s; the run: start -> first step {resumed - started:.1f}s)")


def task_process(job_id: str, task: int):
    """The process of task ``task`` of job ``job_id`` (the python that runs it), on whichever node it is."""
    import psutil

    for process in psutil.process_iter(["cmdline"]):
        try:
            env = process.environ()
            if env.get("SLURM_JOB_ID") == job_id and env.get("SLURM_PROCID") == str(task) \
                    and "submitit.core._submit" in (process.info["cmdline"] or []):
                return process
        except psutil.Error:
            pass
    raise AssertionError(f"no process of task {task} of job {job_id}")


@pytest.mark.slow
def test_a_rank_killed_on_the_second_node_requeues_the_job_which_resumes_bitwise(request, capsys, tmp_path,
                                                                                  mini_data, two_node_reference):
    run_dir = tmp_path / "run"
    job_id = submitted_id(launch(*job_words(run_dir, mini_data, "slurm.nodes=2", "slurm.tasks_per_node=1",
                                            "checkpoint.every_steps=4")))
    wait_for_step(run_dir, 9)
    victim = task_process(job_id, 1)
    hosts = task_hosts(run_dir, job_id, 2)
    assert hosts[0] != hosts[1]  # the killed rank is on the second node
    everyone = [task_process(job_id, 0), victim]
    victim.kill()
    killed = time.time()
    while any(p.is_running() and p.status() != "zombie" for p in everyone):
        assert time.time() < killed + 60, job_logs(run_dir)
        time.sleep(0.1)
    all_gone = time.time() - killed
    wait_done(job_id, run_dir)

    (job,) = job_fields(job_id)
    assert (job["JobState"], job["Restarts"]) == ("COMPLETED", "1"), job_logs(run_dir)
    (failure,) = json.loads((run_dir / "slurm/failures.json").read_text())
    assert failure["requeued"] and failure["attempt"] == 1 and failure["count"] == 1 and failure["step"] == 8
    log = (run_dir / "train.log").read_text()
    assert f"attempt 1 of job {job_id} failed (srun exit status {failure['status']}" in log
    assert "1 failure(s) of this job, counted 1 of slurm.max_failures=3: requeued, resuming from checkpoint step 8" \
        in log
    assert "Resuming from" in log and "step-000000008.pt" in log
    assert (run_dir / "model_final.pt").read_bytes() == (two_node_reference[0] / "model_final.pt").read_bytes()
    steps = [json.loads(line)["global_step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if '"event": "train"' in line]
    assert steps == list(range(1, 21))
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    resumed = next(e["time"] for e in events if e["event"] == "train" and e["time"] > killed)
    status = launch("status", str(run_dir))
    assert "failures   1 (counted 1 of slurm.max_failures); the last: attempt 1, srun exit status" in status.stdout
    with capsys.disabled():
        print(f"\nSIGKILL of rank 1 on the second node: every task gone {all_gone:.1f}s later, first resumed step "
              f"{resumed - killed:.1f}s after the kill")


@pytest.mark.slow
def test_a_job_past_max_requeues_fails_and_says_so(slurm, tmp_path, mini_data):
    run_dir = tmp_path / "run"
    job_id = submitted_id(launch(*job_words(run_dir, mini_data, "slurm.max_requeues=0", *SYNTHETIC)))
    wait_for_step(run_dir, 3)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    deadline = time.monotonic() + 120
    while job_id in queue():
        assert time.monotonic() < deadline, job_logs(run_dir)
        time.sleep(1)
    assert not (run_dir / "summary.json").exists()
    err = (run_dir / f"slurm/{job_id}_0_log.err").read_text()
    assert "Not requeued: the job was already requeued 0 times after a time limit or a preemption " \
           "(slurm.max_requeues=0)" in err
    assert f"attempt 1 of job {job_id} ended on purpose (slurm.max_requeues=0 reached): not requeued" in err
    status = launch("status", str(run_dir))
    saved = re.search(r"checkpoint .*step-(\d{9})\.pt", status.stdout)
    # the stop checkpoint: at or after the step the signal followed (a loaded machine runs a few more steps
    # before the signal lands, and the ranks agree a step later), well before the end (step 40)
    assert status.returncode == 0 and saved and 3 <= int(saved.group(1)) < 40, status.stdout


@pytest.mark.slow
def test_a_diverging_job_fails_and_is_not_requeued(slurm, tmp_path, mini_data):
    run_dir = tmp_path / "run"
    job_id = submitted_id(launch(*job_words(run_dir, mini_data, "data.backend=synthetic", "data.synthetic_steps=100",
                                            "train.batch_size=32", "optim.lr=2000", "schedule.warmup_epochs=0.5",
                                            "checkpoint.every_steps=2")))
    deadline = time.monotonic() + 300
    while job_id in queue():
        assert time.monotonic() < deadline, job_logs(run_dir)
        time.sleep(1)
    (job,) = job_fields(job_id)
    assert (job["JobState"], job["Restarts"]) == ("FAILED", "0"), job_logs(run_dir)
    assert "NonFiniteLoss: Stopped: the " in (run_dir / f"slurm/{job_id}_0_log.err").read_text()
    assert not (run_dir / "summary.json").exists()
    status = launch("status", str(run_dir))
    assert f"job {job_id}: FAILED" in status.stdout, status.stdout


@pytest.mark.slow
@pytest.mark.parametrize("nodes", [1, 2])
def test_a_sweep_is_one_array_with_a_run_dir_per_point(slurm, tmp_path, mini_data, nodes):
    base = tmp_path / "sweep"
    result = launch(*job_words(base, mini_data, f"slurm.nodes={nodes}", "slurm.tasks_per_node=1", *SYNTHETIC,
                               "data.synthetic_steps=4"), "--sweep", "optim.lr=0.05,0.1", "--wait", timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    ids = re.findall(r"submitted job (\S+)", result.stdout)
    assert len(ids) == 2 and len({i.split("_")[0] for i in ids}) == 1  # one array, two tasks
    # each point of the array held its own `nodes` nodes
    held = {job["JobId"]: job["NumNodes"] for job in job_fields(ids[0].split("_")[0])}
    assert sorted(held.values()) == [str(nodes)] * 2, held
    for point, lr in (("lr-0.05", 0.05), ("lr-0.1", 0.1)):
        run_dir = base / point
        assert json.loads((run_dir / "summary.json").read_text())["world_size"] == nodes
        assert f"lr: {lr}" in (run_dir / "config.yaml").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("nodes", [1, 2])
def test_cancel_checkpoints_at_the_next_step_and_status_tells_the_state(slurm, tmp_path, mini_data, nodes):
    run_dir = tmp_path / "run"
    job_id = submitted_id(launch(*job_words(run_dir, mini_data, *SYNTHETIC, f"slurm.nodes={nodes}",
                                            f"slurm.tasks_per_node={2 // nodes}")))
    wait_for_step(run_dir, 3)
    if nodes == 2:
        status = launch("status", str(run_dir))
        assert f"job {job_id}: RUNNING, restarts 0" in status.stdout, status.stdout + status.stderr
        assert job_fields(job_id)[0]["NodeList"] == "node[1-2]"
    cancelled = launch("cancel", str(run_dir))
    assert cancelled.returncode == 0 and f"cancelled job {job_id}" in cancelled.stdout
    deadline = time.monotonic() + 60
    while job_id in queue():
        assert time.monotonic() < deadline, job_logs(run_dir)
        time.sleep(1)
    assert "(stop signal SIGTERM)" in (run_dir / "train.log").read_text()  # scancel's SIGTERM, then KillWait
    status = launch("status", str(run_dir))
    saved = re.search(r"checkpoint .*step-(\d{9})\.pt", status.stdout)
    # at or after the step the cancel followed (a loaded machine may run a few more before SIGTERM lands)
    assert f"job {job_id}: CANCELLED" in status.stdout and saved and int(saved.group(1)) >= 3


def hold_both_nodes(seconds: int) -> str:
    """A job that takes every CPU of both nodes for a while, so the next one must wait (Reason=Resources)."""
    out = subprocess.run(["sbatch", "--parsable", "-N", "2", "--exclusive", "-o", "/dev/null", "--wrap",
                          f"sleep {seconds}"], capture_output=True, text=True, check=True)
    job_id = out.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 30
    while job_fields(job_id)[0]["JobState"] != "RUNNING":  # else the next job may wait on Priority instead
        assert time.monotonic() < deadline, job_fields(job_id)
        time.sleep(0.2)
    return job_id


@pytest.mark.slow
def test_wait_tells_each_pending_reason_and_a_busy_run_dir_is_refused(slurm, tmp_path, mini_data):
    run_dir = tmp_path / "run"
    blocker = hold_both_nodes(90)
    try:
        waiting = subprocess.Popen([sys.executable, "-m", "launch.slurm", *job_words(run_dir, mini_data, *SYNTHETIC),
                                    "--wait"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        said = []
        while not said or not re.search(r"PENDING \(|RUNNING", said[-1]):  # the first reason --wait reports
            line = waiting.stdout.readline()
            assert line, "".join(said) + waiting.stderr.read()
            said.append(line)
        job_id = json.loads((run_dir / "slurm/job.json").read_text())["job_id"]
        assert said[-1] == f"{job_id}: PENDING (Resources)\n"
        # the job is queued behind the blocker: a second submission into its run dir is refused, by name
        before = queue()
        again = launch(*job_words(run_dir, mini_data, *SYNTHETIC))
        assert again.returncode == 2, again.stdout + again.stderr
        assert f"run.dir='{run_dir}' belongs to job {job_id}, which is PENDING" in again.stderr
        assert queue() == before
    finally:
        subprocess.run(["scancel", blocker])
    stdout, stderr = waiting.communicate(timeout=300)
    assert waiting.returncode == 0, stdout + stderr
    assert stdout.splitlines()[0] == f"{job_id}: RUNNING", stdout  # the next change, once the nodes are free
    assert '"epochs_completed": 1' in stdout


@pytest.mark.slow
def test_wait_stops_at_a_pending_reason_that_never_resolves(slurm, tmp_path, capsys):
    from launch.slurm import wait

    # more CPUs on one node than any node has: SLURM takes the job and keeps it PENDING (PartitionConfig)
    cpus = max(int(c) for c in subprocess.run(["sinfo", "-h", "-N", "-o", "%c"], capture_output=True, text=True,
                                              check=True).stdout.split())
    for factor in (1, 2, 4, 8):  # sbatch refuses some such requests at once (a node's CPU count), keeps others
        out = subprocess.run(["sbatch", "--parsable", "-N", "1", "--ntasks-per-node=2",
                              f"--cpus-per-task={factor * cpus}", "-o", "/dev/null", "--wrap", "true"],
                             capture_output=True, text=True)
        if out.returncode == 0:
            break
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip()
    returned = []
    waiting = threading.Thread(target=lambda: returned.append(wait([{"job_id": job_id, "run_dir": str(tmp_path)}],
                                                                    poll_s=0.5)), daemon=True)
    waiting.start()
    waiting.join(timeout=30)
    subprocess.run(["scancel", job_id])  # ends a wait that did not stop by itself
    waiting.join(timeout=30)
    said = capsys.readouterr().out
    assert returned == [1], said
    assert f"{job_id}: PENDING (PartitionConfig)" in said
    assert f"{job_id} cannot start: Reason=PartitionConfig, the request exceeds what the partition's nodes or " \
           f"limits allow. It stays queued until you cancel it (scancel {job_id})" in said


@pytest.mark.parametrize("profile, words", [("pyxis-4x8", []), ("apptainer-2x4", []),
                                            ("gpu-8-per-task", ["slurm.nodes=4"])])
def test_dry_run_prints_the_reviewed_script_of_each_cluster_profile(profile, words):
    result = launch(str(ROOT / "configs/densenet121.yaml"), f"slurm.profile={profile}", "slurm.partition=gpu",
                    "slurm.account=vision", *words, "--dry-run", env={**os.environ, "USER": "alice"})
    assert result.returncode == 0, result.stderr
    script = result.stdout.replace(sys.executable, "PYTHON")  # the interpreter of a job without a container
    assert script == (Path(__file__).with_name(f"expected-{profile}.sbatch")).read_text()
    assert not Path("/checkpoints/alice").exists()


@pytest.mark.slow
@pytest.mark.parametrize("words, message", [
    (["train.batch_size=33"], "train.batch_size=33 (the global batch) does not divide evenly over 2 ranks"),
    (["slurm.time_min=1:99"], "'slurm.time_min' is '1:99'"),
    (["slurm.time_min=two hours"], "not a SLURM time"),
    (["slurm.partition=nope"], "Unknown partition 'slurm.partition=nope'. This cluster has: debug"),
    (["slurm.profile=nope"], "Unknown 'slurm.profile' 'nope'"),
    (["data.workers=4"], "'data.workers' (4) is more than 'slurm.cpus_per_task' (1)"),
    (["slurm.container_runtime=docker"], "'slurm.container_runtime' is 'docker'; allowed values: pyxis, apptainer"),
    (["slurm.container_runtime=apptainer", "slurm.container_image=/nowhere/densenet.sif"],
     "'slurm.container_image' /nowhere/densenet.sif does not exist"),
])
def test_bad_input_is_explained_and_nothing_is_submitted(slurm, tmp_path, mini_data, words, message):
    run_dir = tmp_path / "run"
    before = queue()
    result = launch(*job_words(run_dir, mini_data, *words))
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert queue() == before and not run_dir.exists()


def test_without_slurm_on_path_nothing_is_submitted(tmp_path, mini_data):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}
    result = launch(*job_words(run_dir, mini_data), env=env)
    assert result.returncode == 2 and "sbatch, squeue, scontrol, sinfo not found on PATH" in result.stderr
    assert not run_dir.exists()


def test_submitting_from_inside_a_job_drops_its_slurm_variables(tmp_path, monkeypatch):
    from launch.slurm import clean_env

    monkeypatch.setenv("SLURM_JOB_ID", "41")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("SLURM_CONF", "/etc/slurm/slurm.conf")
    with clean_env():
        assert "SLURM_JOB_ID" not in os.environ and "MASTER_PORT" not in os.environ
        assert os.environ["SLURM_CONF"] == "/etc/slurm/slurm.conf"
    assert os.environ["SLURM_JOB_ID"] == "41"


@pytest.mark.parametrize("text, minutes", [("90", 90), ("1:30", 2), ("01:00:00", 60), ("2-00:00:00", 2880),
                                           ("1-12", 2160), ("0-00:30", 30)])
def test_slurm_time_formats(text, minutes):
    assert time_minutes(text) == minutes


@pytest.mark.parametrize("text", ["", "1h", "1:60", "0", "-5", "1:2:3:4"])
def test_bad_slurm_times_are_refused(text):
    with pytest.raises(LaunchError, match="slurm.time_min"):
        time_minutes(text)


def node(cpus, gpus=0, mem_gb=64):
    return {"name": "n", "cpus": cpus, "gpus": gpus, "mem_mb": mem_gb * 1024}


@pytest.mark.parametrize("words, nodes, message", [
    (["slurm.gpus_per_node=0", "slurm.tasks_per_node=2", "slurm.cpus_per_task=8"], [node(2)] * 2,
     "1 node(s), each with 2 task(s) x 8 CPU(s) = 16 CPUs, 0 GPU(s); the default partition has 2 node(s), 0 of "
     "which can hold that; the largest has 2 CPUs"),
    (["slurm.gpus_per_node=8", "slurm.cpus_per_task=12", "slurm.nodes=2"], [node(96, 4)] * 4,
     "8 task(s) x 12 CPU(s) = 96 CPUs, 8 GPU(s)"),
    (["slurm.gpus_per_node=4", "slurm.cpus_per_task=8", "slurm.nodes=3", "slurm.partition=gpu"],
     [node(64, 4), node(64, 4), node(16, 4)], "partition 'gpu' has 3 node(s), 2 of which can hold that"),
    (["slurm.gpus_per_node=1", "slurm.cpus_per_task=4", "slurm.mem_gb=512"], [node(64, 8, 256)],
     "4 CPUs, 1 GPU(s), 512 GB"),
])
def test_a_request_no_node_can_hold_is_refused_with_what_the_nodes_have(words, nodes, message):
    from launch.slurm import check_fit
    from pipeline.config import load_config

    cfg = load_config(MINI, [*words, "data.workers=1"])
    with pytest.raises(LaunchError, match=re.escape(message)):
        check_fit(cfg, nodes)


def test_a_request_that_fits_the_partition_is_accepted():
    from launch.slurm import check_fit
    from pipeline.config import load_config

    cfg = load_config(MINI, ["slurm.gpus_per_node=8", "slurm.cpus_per_task=12", "slurm.nodes=2"])
    check_fit(cfg, [node(96, 8), node(16, 2), node(128, 8, 1024)])


def test_failures_at_the_same_checkpoint_count_twice_and_a_job_past_its_budget_is_not_requeued(tmp_path,
                                                                                                monkeypatch):
    from launch.requeue import after_step, failure_count, record_end, remember_runs

    assert [failure_count([{"step": s} for s in past], new) for past, new in
            [([], 0), ([0], 0), ([0, 0], 0), ([4], 8), ([4, 8], 12), ([4, 8], 8)]] == [1, 3, 5, 2, 3, 4]
    run_dir, folder = tmp_path / "run", tmp_path / "run" / "slurm"
    folder.mkdir(parents=True)
    remember_runs(folder, {"7": str(run_dir)})
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no scontrol: the decision is made, not carried out
    env = {"SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "0"}
    assert after_step(folder, 0, 3, env) == ""  # a step that succeeded
    record_end(run_dir, 2, "ConfigError: a refused config", env)
    assert after_step(folder, 2, 3, env) == ("attempt 1 of job 7 ended on purpose (ConfigError: a refused "
                                             "config): not requeued by this script")
    env["SLURM_RESTART_COUNT"] = "1"
    said = after_step(folder, 137, 3, env)
    assert said.startswith(f"attempt 2 of job 7 failed (srun exit status 137: a task died, crashed or hung; its "
                           f"own log in {folder} says why); 1 failure(s) of this job, counted 1 of "
                           "slurm.max_failures=3: not requeued, scontrol is not on PATH here")
    for attempt in (2, 3):
        env["SLURM_RESTART_COUNT"] = str(attempt)
        said = after_step(folder, 137, 3, env)
    assert "3 failure(s) of this job, counted 5 of slurm.max_failures=3: not requeued, too many failures" in said
    recorded = json.loads((run_dir / "slurm/failures.json").read_text())
    assert [(f["attempt"], f["count"], f["requeued"]) for f in recorded] == [(2, 1, False), (3, 3, False),
                                                                            (4, 5, False)]
    assert "ERROR launch.requeue: attempt 4 of job 7 failed" in (run_dir / "train.log").read_text()


def mlflow_words(tmp_path):
    return ["tracking.backend=mlflow", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "tracking.required=true"]


def active_runs(tmp_path) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return [run for exp in client.search_experiments() for run in client.search_runs([exp.experiment_id])]


@pytest.mark.slow
def test_a_refused_submission_leaves_no_mlflow_run_and_no_new_run_dir(slurm, tmp_path, mini_data):
    run_dir = tmp_path / "run"
    before = queue()
    result = launch(*job_words(run_dir, mini_data, *mlflow_words(tmp_path), "slurm.constraint=nosuchfeature"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "sbatch refused the job" in result.stderr and "Invalid feature specification" in result.stderr
    assert f"{run_dir} removed" in result.stderr and "deleted" in result.stderr, result.stderr
    assert not run_dir.exists() and queue() == before
    assert active_runs(tmp_path) == []


@pytest.mark.slow
def test_a_refused_submission_into_an_existing_run_dir_leaves_it_as_it_was(slurm, tmp_path, mini_data):
    run_dir = tmp_path / "run"
    (run_dir / "notes").mkdir(parents=True)
    (run_dir / "notes" / "idea.txt").write_text("try a larger lr")
    (run_dir / "config.yaml").write_text("# the config of the run that was here\n")
    had = {p: p.read_bytes() if p.is_file() else None for p in run_dir.rglob("*")}
    result = launch(*job_words(run_dir, mini_data, *mlflow_words(tmp_path), "slurm.constraint=nosuchfeature"))
    assert result.returncode == 2 and "sbatch refused the job" in result.stderr, result.stdout + result.stderr
    assert {p: p.read_bytes() if p.is_file() else None for p in run_dir.rglob("*")} == had
    assert active_runs(tmp_path) == []


@pytest.mark.slow
def test_a_controller_that_does_not_answer_stops_the_submission_with_sinfos_error(slurm, tmp_path, mini_data):
    # the clients ask a port where no controller listens: sinfo fails for real, as with slurmctld down
    conf = tmp_path / "slurm.conf"
    conf.write_text("".join(line for line in Path(slurm).read_text().splitlines(keepends=True)
                            if not line.startswith("SlurmctldPort")) + "SlurmctldPort=6999\n")
    run_dir = tmp_path / "run"
    result = launch(*job_words(run_dir, mini_data, *mlflow_words(tmp_path)),
                    env={**os.environ, "SLURM_CONF": str(conf)})
    assert result.returncode == 2, result.stdout + result.stderr
    assert "`sinfo -h -N -o '%N|%P|%c|%m|%G'` failed (exit status 1: " in result.stderr, result.stderr
    assert "Unable to contact slurm controller" in result.stderr and "scontrol ping" in result.stderr
    assert not run_dir.exists() and not (tmp_path / "mlflow.db").exists()


def test_a_refusal_takes_back_only_what_the_submission_wrote_not_what_a_live_job_writes_meanwhile(tmp_path):
    sweep = tmp_path / "sweep"
    point, running, new_point, jobs = sweep / "lr-0.1", sweep / "lr-0.2", sweep / "lr-0.4", sweep / "slurm"
    for folder in (point, running, jobs):
        folder.mkdir(parents=True)
    (point / "config.yaml").write_text("# the config it had\n")
    (jobs / "12_0_log.out").write_text("an earlier job's log\n")
    undo = Undo([point, new_point], jobs)
    # what the submission wrote: configs, the MLflow run's id, the lock test's file, submitit's temporary files
    (point / "config.yaml").write_text("# the new config\n")
    (point / "mlflow_run.json").write_text("{}")
    (point / "run.lock").touch()
    new_point.mkdir()
    (new_point / "config.yaml").write_text("# a new point\n")
    (jobs / f"{'a' * 32}.pkl").write_bytes(b"call")
    (jobs / f".submission_file_{'b' * 32}.sh").write_text("#!/bin/bash\n")
    # meanwhile, what live jobs in the same folders write
    (point / "checkpoints").mkdir()
    (point / "checkpoints" / "step-5.pt").write_bytes(b"weights")
    (running / "train.log").write_text("epoch 3\n")
    (jobs / "13_1_log.out").write_text("a running point's log\n")
    said = undo()
    assert f"{new_point} removed." in said and f"{point} holds what it held before." in said, said
    assert not new_point.exists()
    assert (point / "config.yaml").read_text() == "# the config it had\n"
    assert not (point / "mlflow_run.json").exists() and not (point / "run.lock").exists()
    assert (point / "checkpoints" / "step-5.pt").read_bytes() == b"weights"
    assert (running / "train.log").read_text() == "epoch 3\n"
    assert sorted(p.name for p in jobs.iterdir()) == ["12_0_log.out", "13_1_log.out"]
