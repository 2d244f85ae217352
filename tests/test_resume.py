"""Kill or signal real training processes mid-epoch, start them again, and compare with an uninterrupted run."""

import contextlib
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import psutil
import pytest
import torch

from pipeline.checkpoint import RESUME_EXIT_CODE, load_checkpoint
from pipeline.models.densenet import densenet_bc

ROOT = Path(__file__).resolve().parents[1]
MINI = str(ROOT / "configs/mini.yaml")
MODERN = str(ROOT / "configs/mini-modern.yaml")
MODERN_RAMP = ("data.progressive.start_epoch=0", "data.progressive.end_epoch=1")
STEPS_PER_EPOCH = 10  # 640 images, global batch 64
DROPOUT = "model.drop_rate=0.2"  # draws from torch's global generator at every step
pytestmark = pytest.mark.slow


def command(run_dir, data, ranks, backend, *extra, config=MINI):
    words = [f"run.dir={run_dir}", f"data.root={data}", f"data.backend={backend}", "train.epochs=2",
             "train.batch_size=64", "checkpoint.every_steps=4", "train.log_every_steps=1", "data.workers=1",
             "tracking.backend=none", *extra]
    if ranks == 1:
        return [sys.executable, "-m", "pipeline.train", config, *words]
    return [sys.executable, "-m", "launch.local", config, "--nproc-per-node", str(ranks), *words]


def run(cmd, log):
    with open(log, "a") as out:
        return subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=600).returncode


def logged_steps(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    return [e["global_step"] for e in lines if e["event"] == "train"]


def interrupt(cmd, run_dir, at_step, sig, log, group=False):
    """Start ``cmd``, and once it has logged ``at_step`` send ``sig`` to the launcher and every rank it started,
    or (``group``) to every process of their process groups, DataLoader workers included, as SLURM does."""
    with open(log, "a") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while max(logged_steps(run_dir), default=0) < at_step:
        assert proc.poll() is None, Path(log).read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    if group:  # the launcher's group and each rank's (torchrun starts every rank in a session of its own)
        groups = {proc.pid} | {os.getpgid(p.pid) for p in psutil.Process(proc.pid).children(recursive=True)}
        for pgid in groups:
            os.killpg(pgid, sig)
        return proc.wait(timeout=120), groups
    parent = psutil.Process(proc.pid)
    for process in [parent, *parent.children(recursive=True)]:
        process.send_signal(sig)
    return proc.wait(timeout=120)


def group_members(pgid):
    """The processes still in process group ``pgid``."""
    members = []
    for process in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(process.pid) == pgid:
                members.append(process)
        except (ProcessLookupError, psutil.Error):
            pass
    return members


@pytest.fixture(scope="module")
def reference(mini_data, tmp_path_factory):
    """Uninterrupted runs, by (ranks, backend, config, extra overrides)."""
    cache = {}

    def get(ranks, backend, config=MINI, extra=()):
        if (ranks, backend, config, extra) not in cache:
            run_dir = tmp_path_factory.mktemp("reference") / "run"
            assert run(command(run_dir, mini_data, ranks, backend, *extra, config=config),
                       run_dir.parent / "log") == 0
            cache[ranks, backend, config, extra] = run_dir
        return cache[ranks, backend, config, extra]

    return get


def assert_same_run(reference_dir, run_dir):
    assert (run_dir / "model_final.pt").read_bytes() == (reference_dir / "model_final.pt").read_bytes()
    steps = logged_steps(run_dir)
    assert steps == list(range(1, 2 * STEPS_PER_EPOCH + 1))  # each step once, in order
    ours, theirs = (json.loads((d / "summary.json").read_text()) for d in (run_dir, reference_dir))
    assert ours["val_top1"] == theirs["val_top1"] and ours["images_seen"] == theirs["images_seen"]


def mid_epoch_step(request, low=STEPS_PER_EPOCH + 2, high=2 * STEPS_PER_EPOCH - 2):
    """A step in [low, high] drawn from a seed fixed by the test's id; both are printed to replay a failure
    (RESUME_SEED=N overrides the seed)."""
    seed = int(os.environ.get("RESUME_SEED") or zlib.crc32(request.node.nodeid.encode()))
    step = random.Random(seed).randint(low, high)
    print(f"interrupting at global step {step} (RESUME_SEED={seed})")
    return step


@pytest.mark.parametrize("ranks,backend", [(1, "dali"), (1, "torchvision"), (2, "dali")])
def test_sigkill_mid_epoch_then_restart_ends_bitwise_identical(tmp_path, mini_data, reference, ranks, backend,
                                                               request):
    """With dropout (``model.drop_rate``), which draws from torch's global generator every step: the resumed run
    is bitwise the uninterrupted one only if each rank's generator state is saved, restored, and drawn from by
    nothing else (a DataLoader iterator made after the restore draws its workers' seed from it unless given a
    generator of its own)."""
    run_dir, log = tmp_path / "run", tmp_path / "log"
    cmd = command(run_dir, mini_data, ranks, backend, DROPOUT)
    interrupt(cmd, run_dir, mid_epoch_step(request), signal.SIGKILL, log)
    assert not (run_dir / "model_final.pt").exists()
    assert run(cmd, log) == 0, log.read_text()[-3000:]
    assert "Resuming from" in log.read_text()
    assert_same_run(reference(ranks, backend, extra=(DROPOUT,)), run_dir)


@pytest.mark.parametrize("ranks", [1, 2])
def test_the_modern_recipe_resumes_bitwise_after_a_sigkill_with_its_ema(tmp_path, mini_data, reference, ranks,
                                                                         request):
    """configs/mini-modern.yaml: EMA, mixup and CutMix, TrivialAugment-wide, random erasing, repeated augmentation,
    progressive resizing (24 px in epoch 1, 32 px in epoch 2, where the kill falls), label smoothing, no weight
    decay on norms, clipping."""
    run_dir, log = tmp_path / "run", tmp_path / "log"
    cmd = command(run_dir, mini_data, ranks, "dali", *MODERN_RAMP, config=MODERN)
    interrupt(cmd, run_dir, mid_epoch_step(request), signal.SIGKILL, log)
    assert run(cmd, log) == 0, log.read_text()[-3000:]
    assert "Resuming from" in log.read_text()
    assert "epoch 2 trains at 32 px (data.progressive)" in (run_dir / "train.log").read_text()
    expected = reference(ranks, "dali", MODERN, MODERN_RAMP)
    assert_same_run(expected, run_dir)
    assert (run_dir / "model_ema.pt").read_bytes() == (expected / "model_ema.pt").read_bytes()
    densenet_bc(16, 12, num_classes=10).load_state_dict(torch.load(run_dir / "model_ema.pt", weights_only=True))
    # the best checkpoint kept is the EMA's best epoch (checkpoint.best=auto with train.ema on)
    summary = json.loads((run_dir / "summary.json").read_text())
    vals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"val"' in line]
    best = max(vals, key=lambda v: v["ema_top1"])  # the first of equals, as the run keeps it
    assert summary["best_of"] == "ema" and summary["best_val_top1"] == best["ema_top1"]
    assert (run_dir / "checkpoints" / f"step-{best['global_step']:09d}.pt").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR2], ids=["SIGTERM", "SIGUSR2"])
@pytest.mark.parametrize("backend", ["dali", "torchvision"])
@pytest.mark.parametrize("ranks", [1, 2])
def test_a_stop_signal_to_the_whole_process_group_checkpoints_at_the_next_step_and_resumes_bitwise(
        tmp_path, mini_data, reference, ranks, backend, sig, request):
    run_dir, log = tmp_path / "run", tmp_path / "log"
    cmd = command(run_dir, mini_data, ranks, backend)
    at_step = mid_epoch_step(request)
    status, groups = interrupt(cmd, run_dir, at_step, sig, log, group=True)
    name = signal.Signals(sig).name
    text = log.read_text()
    assert "is killed by signal" not in text, text[-3000:]
    assert status == RESUME_EXIT_CODE, text[-3000:]
    pointer = json.loads((run_dir / "checkpoints" / "latest").read_text())
    # the next step boundary, not the next every_steps; on several ranks the line of a step is written once the
    # next step's boundary has every rank's figures for it, so the signal comes a step later
    assert at_step <= pointer["global_step"] <= at_step + (2 if ranks == 1 else 3)
    assert "Checkpoint on disk" in text and f"after {name}" in text
    assert "run the same command again" in text and f"{os.getcwd()}:\n  {shlex.join(cmd)}\n" in text
    time.sleep(0.5)
    assert [p for pgid in groups for p in group_members(pgid)] == []  # the workers ended with their rank
    assert run(cmd, log) == 0, log.read_text()[-3000:]
    assert_same_run(reference(ranks, backend), run_dir)


# a stop signal at chosen moments, sent to rank 1 only: (moment for tests/stop_at.py, the stop checkpoint's step)
MOMENTS = {
    "mid-epoch-at-a-checkpoint-step": ("step:12@1", 12),  # a timed and a stop checkpoint at once: one file
    "the-last-step-of-an-epoch": ("step:10@1", 10),  # agreed at once; validation comes after the resume
    "between-validation-and-its-checkpoint": ("validation:0@1", 10),  # the end-of-epoch checkpoint is the stop's
    "the-first-step-of-an-epoch": ("step:11@1", 12),
}


@pytest.mark.parametrize("moment", MOMENTS)
def test_a_stop_at_each_moment_exits_75_on_every_rank_and_resumes_bitwise(tmp_path, mini_data, reference, moment):
    from pipeline.distributed import free_port

    at, expected_step = MOMENTS[moment]
    print(f"stop signal at {at} ({moment})")
    run_dir = tmp_path / "run"
    words = command(run_dir, mini_data, 1, "dali")[3:]  # the config and overrides of pipeline.train
    port = free_port()
    procs, logs = [], [tmp_path / f"rank-{rank}.log" for rank in range(2)]
    for rank in range(2):  # the ranks started as torchrun would, each one's exit status seen here
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1"}  # as torchrun sets it: the same CPU kernels, the same bits
        with open(logs[rank], "w") as out:
            procs.append(subprocess.Popen([sys.executable, str(ROOT / "tests/stop_at.py"), at, *words], env=env,
                                          stdout=out, stderr=subprocess.STDOUT))
    statuses = [p.wait(timeout=600) for p in procs]
    text = logs[0].read_text()
    assert statuses == [RESUME_EXIT_CODE, RESUME_EXIT_CODE], text[-3000:] + logs[1].read_text()[-3000:]
    assert "sending SIGUSR2" in logs[1].read_text() and "sending SIGUSR2" not in text
    saved = re.findall(r"Saved (step-\d+)\S* \((.*?)\)", text)
    assert len({name for name, _ in saved}) == len(saved), saved  # one checkpoint per step
    assert saved[-1][1] == "stop signal SIGUSR2 on another rank", saved  # rank 0 got no signal: rank 1's stop
    pointer = json.loads((run_dir / "checkpoints" / "latest").read_text())
    assert pointer["global_step"] == expected_step, (pointer, saved)
    assert not (run_dir / "model_final.pt").exists()
    log = tmp_path / "resume.log"
    assert run(command(run_dir, mini_data, 2, "dali"), log) == 0, log.read_text()[-3000:]
    assert_same_run(reference(2, "dali"), run_dir)


def test_resume_with_more_epochs_continues_and_with_another_model_is_refused(tmp_path, mini_data, reference):
    run_dir = tmp_path / "run"
    shutil.copytree(reference(1, "dali"), run_dir)
    other = run(command(run_dir, mini_data, 1, "dali", "model.name=densenet121"), tmp_path / "log")
    assert other == 2 and "model.name: 'densenet_bc' -> 'densenet121'" in (tmp_path / "log").read_text()
    assert run(command(run_dir, mini_data, 1, "dali", "train.epochs=3"), tmp_path / "log") == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs_completed"] == 3 and summary["global_step"] == 3 * STEPS_PER_EPOCH
    assert logged_steps(run_dir) == list(range(1, 3 * STEPS_PER_EPOCH + 1))


def test_killing_during_checkpoint_writes_never_leaves_the_pointer_on_a_bad_file(tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "log"
    folder = run_dir / "checkpoints"
    # densenet121's checkpoints take about as long to write as a step takes: kills land mid-write
    cmd = [sys.executable, "-m", "pipeline.train", MINI, f"run.dir={run_dir}", "model.name=densenet121",
           "data.backend=synthetic", "data.synthetic_steps=1000", "data.image_size=32", "train.batch_size=2",
           "checkpoint.every_steps=1", "checkpoint.keep_last=1", "train.log_every_steps=1",
           "tracking.backend=none"]
    for _ in range(3):
        with open(log, "a") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        # until one checkpoint of this attempt is complete and the next is being written
        while not (list(folder.glob("step-*.json")) and list(folder.glob(".step-*.pt.tmp-*"))):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.002)
        time.sleep(random.uniform(0, 0.05))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pointer = json.loads((folder / "latest").read_text())
        state = load_checkpoint(folder / pointer["file"])  # complete, and its checksum matches
        assert state["progress"]["global_step"] == pointer["global_step"]


def test_resume_from_a_named_checkpoint_file_in_a_new_run_dir(tmp_path, mini_data, reference):
    source = reference(1, "dali") / "checkpoints"
    # a checkpoint kept from the second epoch of the reference run
    checkpoint = next(p for p in sorted(source.glob("step-*.pt"))
                      if json.loads(p.with_suffix(".json").read_text())["global_step"] >= STEPS_PER_EPOCH)
    run_dir, log = tmp_path / "run", tmp_path / "log"
    assert run(command(run_dir, mini_data, 1, "dali", f"run.resume={checkpoint}"), log) == 0, log.read_text()
    assert f"Resuming from {checkpoint}" in log.read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_step"] == 2 * STEPS_PER_EPOCH
    assert min(logged_steps(run_dir)) > STEPS_PER_EPOCH  # only what came after the checkpoint was trained here


def recorded(run_dir):
    """(world size, epoch, step, rank, ids) of every step each rank recorded (data.record_ids): the ids that
    came with each batch out of the loader (DALI's outputs, or the DataLoader workers')."""
    rows = []
    for path in sorted((Path(run_dir) / "sample_ids").glob("rank-*.txt")):
        rank = int(path.stem.split("-")[1])
        for line in path.read_text().splitlines():
            world, epoch, step, *ids = map(int, line.split())
            rows.append((world, epoch, step, rank, ids))
    return rows


@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_sigkill_at_world_3_then_restart_at_world_2_reads_each_sample_of_the_epoch_once(tmp_path, mini_data,
                                                                                        backend, request):
    from pipeline.data.index import load_index
    from pipeline.data.order import epoch_order

    run_dir, log = tmp_path / "run", tmp_path / "log"
    global_batch, steps = 48, 640 // 48  # 13 steps per epoch at world 3 and at world 2
    extra = [f"train.batch_size={global_batch}", "data.record_ids=true", "checkpoint.every_steps=3"]
    at_step = mid_epoch_step(request, steps + 4, 2 * steps - 3)
    interrupt(command(run_dir, mini_data, 3, backend, *extra), run_dir, at_step, signal.SIGKILL, log)
    assert run(command(run_dir, mini_data, 2, backend, *extra), log) == 0, log.read_text()[-3000:]
    assert "Resuming on 2 ranks a run saved by 3" in log.read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 2 * steps

    rows = recorded(run_dir)
    resumed_at = min(step for world, epoch, step, _, _ in rows if world == 2 and epoch == 1)
    assert 0 < resumed_at < steps
    # what the run kept: world 3's steps before the checkpoint it resumed from, then world 2's
    kept = [(step, rank, ids) for world, epoch, step, rank, ids in rows
            if epoch == 1 and ((world == 3 and step < resumed_at) or world == 2)]
    read = [i for _, _, ids in sorted(kept) for i in ids]
    order = epoch_order(len(load_index(mini_data).splits["train"]), 1, 0, global_batch).tolist()
    assert read == order  # every sample of the epoch once, in the epoch's global order
    assert len(set(read)) == steps * global_batch


def test_resume_after_a_new_verify_is_refused_or_continues_at_the_next_epoch(tmp_path, mini_data):
    data = tmp_path / "data"
    shutil.copytree(mini_data, data)
    run_dir, log = tmp_path / "run", tmp_path / "log"
    cmd = command(run_dir, data, 1, "dali", "train.epochs=3")
    interrupt(cmd, run_dir, STEPS_PER_EPOCH + 6, signal.SIGKILL, log)  # a crash mid-epoch 2
    saved_at = json.loads((run_dir / "checkpoints" / "latest").read_text())["global_step"]
    assert STEPS_PER_EPOCH < saved_at < 2 * STEPS_PER_EPOCH
    next(iter(sorted((data / "train").rglob("*.JPEG")))).write_bytes(b"")  # a file damaged since
    assert subprocess.run([sys.executable, "-m", "pipeline.data.imagenet", "verify", str(data)],
                          capture_output=True, timeout=300).returncode == 0
    assert run(cmd, log) == 2
    text = log.read_text()
    assert "now has index" in text and "train: 640 -> 639 samples" in text and "n10000000 64 -> 63" in text
    assert "run.on_dataset_change=next_epoch" in text
    assert run([*cmd, "run.on_dataset_change=next_epoch"], log) == 0, log.read_text()[-3000:]
    assert "the rest of epoch 2 is skipped" in log.read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    # the rest of epoch 2 left out, then epoch 3 on the new dataset: 639 // 64 steps
    assert summary["epochs_completed"] == 3 and summary["global_step"] == saved_at + 639 // 64


def test_a_run_resumes_on_a_packed_copy_of_its_dataset(tmp_path, mini_data, reference):
    from pipeline.data.imagenet import pack

    run_dir, log = tmp_path / "run", tmp_path / "log"
    shutil.copytree(reference(1, "dali"), run_dir)
    packed = tmp_path / "packed"
    pack(mini_data, packed, shard_size=2**20)  # data.root moves; the index hash, not the path, names the data
    assert run(command(run_dir, packed, 1, "dali", "train.epochs=3"), log) == 0, log.read_text()[-3000:]
    assert "Resuming from" in log.read_text() and "in 3 shards" in log.read_text()
    assert json.loads((run_dir / "summary.json").read_text())["epochs_completed"] == 3


def rank_processes(launcher: psutil.Process) -> dict[int, psutil.Process]:
    """The training processes that torchrun started under ``launcher``, by their RANK."""
    ranks = {}
    for process in launcher.children(recursive=True):
        try:
            if "pipeline.train" in process.cmdline():
                ranks[int(process.environ()["RANK"])] = process
        except (psutil.Error, KeyError):
            pass
    return ranks


def test_a_rank_stopped_by_sigstop_ends_the_job_with_stacks_in_the_log_then_resumes_bitwise(
        tmp_path, mini_data, reference, request, capsys):
    hang_s = 8
    run_dir, log = tmp_path / "run", tmp_path / "log"
    cmd = command(run_dir, mini_data, 2, "dali", f"run.hang_timeout_s={hang_s}")
    at_step = mid_epoch_step(request, 2, 2 * STEPS_PER_EPOCH - 4)
    with open(log, "a") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while max(logged_steps(run_dir), default=0) < at_step:
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.02)
    launcher = psutil.Process(proc.pid)
    ranks = rank_processes(launcher)
    assert sorted(ranks) == [0, 1]
    everyone = [launcher, *launcher.children(recursive=True)]
    ranks[1].suspend()  # SIGSTOP: rank 0 now waits for it in the step's all-reduce
    stopped = time.monotonic()
    try:
        status = proc.wait(timeout=hang_s + 120)
    finally:
        for p in everyone:
            with contextlib.suppress(psutil.Error):
                p.kill()
    while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in everyone):
        assert time.monotonic() < stopped + hang_s + 90, [p for p in everyone if p.is_running()]
        time.sleep(0.1)
    all_gone = time.monotonic() - stopped
    text = log.read_text()
    assert status == RESUME_EXIT_CODE, text[-3000:]
    assert all_gone < hang_s + 60
    said = re.search(r"\[rank 0/2\] ERROR pipeline.hang: rank 0 on \S+: no training step finished for (\d+)s "
                     rf"\(run.hang_timeout_s={hang_s}; the last one was global step (\d+)\)", text)
    assert said, text[-3000:]
    assert int(said.group(1)) >= hang_s and at_step <= int(said.group(2)) <= at_step + 2
    stacks = text[said.end():]
    main_thread = stacks.split("\n\n")[0]  # shown first
    assert "were here:\nMainThread, most recent call last:" in main_thread and "in train_one_epoch" in main_thread
    assert "rank(s) 1 hung and were killed" in text

    restarted = time.monotonic()
    with open(log, "a") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    resumed_from = max(logged_steps(run_dir), default=0)
    while max(logged_steps(run_dir), default=0) <= resumed_from and proc.poll() is None:
        time.sleep(0.05)
    first_step = time.monotonic() - restarted
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    assert_same_run(reference(2, "dali"), run_dir)
    with capsys.disabled():
        print(f"\nSIGSTOP of rank 1 at step {at_step} (run.hang_timeout_s={hang_s}): every process gone "
              f"{all_gone:.1f}s later; restart -> first resumed step {first_step:.1f}s")
