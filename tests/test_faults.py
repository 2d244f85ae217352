"""Faults made for real: a full disk under a running job (a tmpfs in a private mount namespace), nodes that
start with different configs."""

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
MINI = str(ROOT / "configs/mini.yaml")

# In a mount namespace of its own, a small tmpfs over the run dir; the job trains, and once its checkpoint of
# step 4 is on disk the tmpfs is filled up to the last $LEAVE bytes, so that logs and metrics still fit but the
# next checkpoint does not. Then the filler goes and the same command runs again. Copies of the run dir after
# each come back in $OUT (the tmpfs ends with the namespace).
FULL_DISK = r"""
set -u
mount -t tmpfs -o size=8m tmpfs "$RUN"
"$@" > "$OUT/first.log" 2>&1 &
job=$!
while [ ! -f "$RUN/checkpoints/step-000000004.json" ] && kill -0 "$job" 2>/dev/null; do sleep 0.05; done
free=$(df --output=avail -B1 "$RUN" | tail -1)
dd if=/dev/zero of="$RUN/filler" bs=4096 count=$(( (free - LEAVE) / 4096 )) status=none
wait "$job"; echo "first=$?"
cp -a "$RUN" "$OUT/after-failure"
rm "$RUN/filler"
"$@" > "$OUT/second.log" 2>&1; echo "second=$?"
cp -a "$RUN" "$OUT/after-resume"
"""


@pytest.mark.slow
def test_a_full_disk_stops_every_rank_at_the_failed_checkpoint_keeping_the_one_before(tmp_path, mini_data):
    run_dir, out = tmp_path / "run", tmp_path / "out"
    run_dir.mkdir()
    out.mkdir()
    train = [sys.executable, "-m", "launch.local", MINI, "--nproc-per-node", "2", f"run.dir={run_dir}",
             f"data.root={mini_data}", "train.epochs=1", "train.batch_size=64", "checkpoint.every_steps=4",
             "checkpoint.keep_last=1", "train.log_every_steps=1", "data.workers=1", "tracking.backend=none",
             "insights.enabled=false"]
    result = subprocess.run(["unshare", "-m", "--propagation", "private", "bash", "-c", FULL_DISK, "full-disk",
                             *train], capture_output=True, text=True, timeout=600, cwd=ROOT,
                            env={"RUN": str(run_dir), "OUT": str(out), "LEAVE": str(96 * 1024),
                                 "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"})
    first, second = (out / "first.log").read_text(), (out / "second.log").read_text()
    assert "first=2" in result.stdout, result.stdout + result.stderr + first[-3000:]
    said = re.findall(r"error: Cannot write the checkpoint of step (\d+) into \S+/checkpoints: No space left on "
                      r"device \(([\d.]+ KiB) free of 8.0 MiB on its filesystem\)\. The checkpoint before it "
                      r"\(step-000000004.pt, step 4\) and the latest pointer are intact: once there is room, run the "
                      r"same command again to resume from step 4\.", first)
    assert len(said) == 2 and said[0] == said[1], first[-3000:]  # both ranks, at the same step
    assert int(said[0][0]) in (8, 10)  # the next checkpoint: every 4 steps, or the epoch's end (step 10)
    kept = out / "after-failure" / "checkpoints"
    assert sorted(p.name for p in kept.iterdir()) == ["latest", "step-000000004.json", "step-000000004.pt"]
    assert json.loads((kept / "latest").read_text())["global_step"] == 4
    assert load_checkpoint(kept / "step-000000004.pt")["progress"]["global_step"] == 4

    assert "second=0" in result.stdout, second[-3000:]
    assert "Resuming from" in second and "step-000000004.pt" in second
    assert json.loads((out / "after-resume" / "summary.json").read_text())["global_step"] == 10


@pytest.mark.slow
def test_two_nodes_started_with_different_seeds_stop_before_step_1_naming_the_key_ranks_and_hosts(tmp_path,
                                                                                                  mini_data):
    from pipeline.distributed import free_port

    port = free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "launch.local", MINI, "--nnodes", "2", "--node-rank", str(node),
                               "--nproc-per-node", "1", "--master-port", str(port), f"run.dir={tmp_path / 'run'}",
                               f"data.root={mini_data}", "tracking.backend=none", "data.workers=1",
                               f"run.seed={seed}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
             for node, seed in ((0, 0), (1, 7))]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    host = socket.gethostname()
    for node, out in zip(nodes, outputs, strict=True):
        assert node.returncode == 2, out[-3000:]
        assert (f"error: The ranks do not run the same thing: run.seed is 0 on rank 0 ({host}) but 7 on rank 1 "
                f"({host}). Every rank must train with the same config") in out, out[-3000:]
        assert "start every node with the same command and overrides" in out and "Traceback" not in out
        assert " step " not in out  # before the first step
    assert not (tmp_path / "run" / "checkpoints").exists()
