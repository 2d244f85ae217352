"""The process group, built from the standard variables that torchrun (or the SLURM launcher) sets."""

from __future__ import annotations

import gc
import os
import queue
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# Imported before any process group exists: its functions' defaults are group=group.WORLD, evaluated at import
# (which torch.optim and torch.compile do on first use). Imported after init_process_group, they would hold the
# world group for good, and it could not be freed before the interpreter exits (see shutdown).
import torch.distributed.nn.functional  # noqa: F401, I001

from pipeline import collective


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class RankError(RuntimeError):
    """The process's rank variables cannot describe a correct job."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now, for a rendezvous on this machine."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def run_local_ranks(target: Callable, world_size: int, *args, timeout_s: float = 600.0) -> list:
    """``target(rank, world_size, port, results, *args)`` in ``world_size`` new processes of this machine (a
    group on a free port of 127.0.0.1); returns what they put on ``results``, a queue. A rank that fails, or
    ranks still running after ``timeout_s``, end them all with a RuntimeError that names them."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=target, args=(r, world_size, port, results, *args), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    out, deadline = [], time.monotonic() + timeout_s
    try:
        while True:  # the queue is read while they run: a process exits only once what it put is read
            try:
                out.append(results.get(timeout=0.2))
                continue
            except queue.Empty:
                pass
            failed = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if failed:
                raise RuntimeError(f"rank {failed[0][0]} of {world_size} exited with status {failed[0][1]}")
            if all(p.exitcode == 0 for p in procs):
                return out
            if time.monotonic() > deadline:
                raise RuntimeError(f"ranks {[r for r, p in enumerate(procs) if p.is_alive()]} of {world_size} "
                                   f"still running after {timeout_s:.0f}s")
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join(timeout=10)


def check_rank_environment(env: Mapping[str, str], gpus: int) -> None:
    """Refuse rank variables that would make ranks share a data shard, a GPU or the run dir."""
    if ("RANK" in env) != ("WORLD_SIZE" in env):
        raise RankError(f"Only one of RANK and WORLD_SIZE is set (RANK={env.get('RANK')}, "
                        f"WORLD_SIZE={env.get('WORLD_SIZE')}): set both, or start the ranks with torchrun or "
                        "python -m launch.local / launch.slurm, which set both.")
    if "RANK" not in env:
        tasks = int(env.get("SLURM_STEP_NUM_TASKS") or 1)  # set by srun for its tasks, not in the batch script
        if tasks > 1 and "SLURM_PROCID" in env:
            raise RankError(f"This process is task {env['SLURM_PROCID']} of a SLURM step of {tasks} tasks, but "
                            "RANK and WORLD_SIZE are unset: every task would train alone as rank 0 on the same "
                            "data shard, into the same run.dir. Submit with python -m launch.slurm (it sets them "
                            "from SLURM_PROCID and SLURM_NTASKS), or run one torchrun per node.")
        return
    rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
    local_rank = int(env.get("LOCAL_RANK", 0))
    if not 0 <= rank < world_size:
        raise RankError(f"RANK={rank} is not in 0..WORLD_SIZE-1 (WORLD_SIZE={world_size}): ranks are numbered "
                        "from 0 across all nodes (the global rank), not per node.")
    if gpus > 1 and local_rank >= gpus:
        raise RankError(f"LOCAL_RANK={local_rank} but this node shows {gpus} GPU(s) (CUDA_VISIBLE_DEVICES="
                        f"{env.get('CUDA_VISIBLE_DEVICES', 'unset')}): start one process per visible GPU, with "
                        "LOCAL_RANK counting from 0 on each node, or bind one GPU to each task "
                        "(--gpus-per-task=1, slurm.profile=gpu-8-per-task).")


def gpus_missing(env: Mapping[str, str], found: int) -> str | None:
    """What is wrong when this task was given GPUs (by SLURM, or ``CUDA_VISIBLE_DEVICES``) but PyTorch sees fewer
    (none: a driver too old for this build's CUDA, a CPU build of torch); None when it sees them all."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() not in ("", "-1", "NoDevFiles"):
        # MIG instances: CUDA shows a process one of those it is given
        given = 1 if visible.strip().startswith("MIG-") else len(visible.split(","))
        by = f"CUDA_VISIBLE_DEVICES={visible}"
    elif visible is None and int(env.get("SLURM_GPUS_ON_NODE") or 0) > 0:
        given, by = 1, f"SLURM_GPUS_ON_NODE={env['SLURM_GPUS_ON_NODE']}"  # at least one is this task's
    else:
        return None
    if found >= given:
        return None
    return (f"This task on {socket.gethostname()} was given GPUs ({by}) but PyTorch {torch.__version__} sees {found} "
            f"(torch.cuda.is_available() is {torch.cuda.is_available()}; this build is for CUDA "
            f"{torch.version.cuda or 'none: a CPU build'}; NVIDIA driver: {driver_version()}). Training would run "
            "on the CPU, or on fewer GPUs than the job holds. The driver must support the CUDA version of the "
            "build: update the driver, or install the PyTorch build for the driver's CUDA (README: \"CUDA, DALI and "
            "PyTorch versions\"; e.g. pip install torch --index-url https://download.pytorch.org/whl/cu126); "
            "check that CUDA_VISIBLE_DEVICES names this node's GPUs. If only this node is broken, keep the job off it "
            "(slurm.additional={exclude: NODE}).")


def driver_version() -> str:
    """The NVIDIA driver's version, as NVML reports it, or why it cannot be read."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return str(pynvml.nvmlSystemGetDriverVersion())
        finally:
            pynvml.nvmlShutdown()
    except Exception as err:  # no driver, no libnvidia-ml: NVML's own errors
        return f"not found ({type(err).__name__}: {err})"


def device_index(local_rank: int, gpus: int) -> int:
    """The GPU of this rank: the only one it sees (a site that binds one GPU per task, with --gpus-per-task,
    --gpu-bind or cgroups, shows each task its own as device 0), or its LOCAL_RANK among the node's GPUs."""
    return 0 if gpus == 1 else local_rank


def rendezvous_help(rank: int, world_size: int, err: Exception) -> str:
    """What to check when the ranks did not all meet at the start."""
    master = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    return (f"rank {rank} of {world_size} on {socket.gethostname()} could not reach all the other ranks through "
            f"{master} ({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else err}). "
            "Check that: every rank started (a rank that died first says why in its own log; SLURM writes one "
            "per task); MASTER_ADDR resolves to an address of the first node that the others can reach; the "
            "ranks use the interface that connects the nodes (NCCL_SOCKET_IFNAME for NCCL and "
            "GLOO_SOCKET_IFNAME for gloo, which carries the control messages, e.g. both =ib0 or =eth0); no "
            "firewall blocks MASTER_PORT. run.dist_timeout_s sets how long ranks wait for each other.")


def placement(hosts: list[str], shown: int = 8) -> str:
    """Where the ranks run, from each rank's host name in rank order: 'node1 (ranks 0-1), node2 (ranks 2-3)'."""
    ranks: dict[str, list[int]] = {}
    for rank, host in enumerate(hosts):
        ranks.setdefault(host, []).append(rank)
    parts = [f"{host} (rank {r[0]})" if len(r) == 1 else
             f"{host} (ranks {r[0]}-{r[-1]})" if r == list(range(r[0], r[-1] + 1)) else
             f"{host} (ranks {','.join(map(str, r))})" for host, r in ranks.items()]
    more = f", and {len(parts) - shown} more" if len(parts) > shown else ""
    return f"{len(hosts)} ranks on {len(parts)} host(s): {', '.join(parts[:shown])}{more}"


def disagreements(fingerprints: list[dict], hosts: list[str], shown: int = 5) -> str | None:
    """What the ranks' ``fingerprints`` (flat dicts: config keys, versions, ...) disagree on, against rank 0's,
    naming the values, the ranks and their hosts; None if they all agree ."""
    ours, found = fingerprints[0], []
    for key in dict.fromkeys(key for f in fingerprints for key in f):  # rank 0's order: the config first
        others: dict[str, list[int]] = {}
        for rank, theirs in enumerate(fingerprints):
            if theirs.get(key) != ours.get(key):
                others.setdefault(repr(theirs.get(key)), []).append(rank)
        if others:
            where = "; ".join(f"{value} on {_ranks_on(ranks, hosts)}" for value, ranks in others.items())
            found.append(f"{key} is {ours.get(key)!r} on rank 0 ({hosts[0]}) but {where}")
    if not found:
        return None
    more = f", and {len(found) - shown} more" if len(found) > shown else ""
    return "; ".join(found[:shown]) + more


def _ranks_on(ranks: list[int], hosts: list[str]) -> str:
    named = sorted({hosts[r] for r in ranks})
    listed = ", ".join(map(str, ranks[:8])) + (f" and {len(ranks) - 8} more" if len(ranks) > 8 else "")
    return f"rank{'s' if len(ranks) > 1 else ''} {listed} ({', '.join(named[:4])}{', ...' if len(named) > 4 else ''})"


def init_distributed(timeout_s: float = 1800) -> DistInfo:
    """Read RANK / WORLD_SIZE / LOCAL_RANK (defaults: one process), pick the device, join the group.

    ``timeout_s``: how long a rank waits for the others, at the start and in any collective after.
    """
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    missing = gpus_missing(os.environ, gpus)
    if missing:
        raise RankError(missing)
    check_rank_environment(os.environ, gpus)
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if gpus:
        device = torch.device("cuda", device_index(local_rank, gpus))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        try:
            if device.type == "cuda":  # device_id: NCCL binds this GPU now, and its errors name it
                dist.init_process_group("nccl", rank=rank, world_size=world_size, timeout=timeout,
                                        device_id=device)
            else:
                dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timeout)
        except (dist.DistError, TimeoutError, OSError) as err:  # DistStoreError, DistNetworkError, ...
            raise RankError(rendezvous_help(rank, world_size, err)) from err
        try:  # from here on a failure leaves the group before it propagates
            join_control_group(device, world_size, timeout)
        except BaseException as err:
            shutdown(getattr(err, "on_every_rank", False))
            if isinstance(err, (dist.DistError, TimeoutError, OSError)):
                raise RankError(rendezvous_help(rank, world_size, err)) from err
            raise
    return DistInfo(rank, world_size, local_rank, device)


def join_control_group(device: torch.device, world_size: int, timeout: timedelta) -> None:
    """Make the group for small decisions; on GPUs, also check that no two ranks drive the same GPU."""
    # small decisions (stop, checkpoint now) travel on CPU tensors over gloo: no GPU sync per step
    collective.use_control_group(dist.new_group(backend="gloo", timeout=timeout) if device.type == "cuda"
                                 else dist.group.WORLD)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpus = collective.gather_to_main((socket.gethostname(), str(getattr(props, "uuid", device.index))))
        collective.main_decides(shared_gpus(gpus) if gpus is not None else None, RankError)


def shared_gpus(gpus_of_ranks: list[tuple[str, str]]) -> str | None:
    """What is wrong when two ranks would drive one GPU (each task shown the same single GPU), else None."""
    seen: dict[tuple[str, str], int] = {}
    for rank, gpu in enumerate(gpus_of_ranks):
        if gpu in seen:
            return (f"ranks {seen[gpu]} and {rank} on {gpu[0]} would both use GPU {gpu[1]}: every task sees "
                    "one GPU, but not its own. Ask for one GPU per task (slurm.gpu_binding=task, "
                    "--gpus-per-task=1), or let each task see all of the node's GPUs (slurm.gpu_binding=node), "
                    "or start no more tasks per node than it has GPUs.")
        seen[gpu] = rank
    return None


def shutdown(together: bool = False) -> None:
    """Leave the process group. ``together``: every rank is here (a finished run, an agreed stop or error), so
    wait for all first: rank 0 holds the group's store, and leaving before the others can abort them.

    Then drop the control group (:func:`pipeline.collective.use_control_group`) and collect what else held the
    groups (a DDP model is in a reference cycle; an error's traceback must not hold its frames by then: see
    ``pipeline.train.main``), so they are freed while the interpreter is whole. A gloo group freed only at exit
    aborts the process (SIGABRT, "terminate called without an active exception"): its worker thread frees the
    last collective's tensors and needs the GIL, which the exiting interpreter no longer gives (pytorch#179291).
    That turns an exit status such as 75 (resume me) into a crash."""
    if dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()
    collective.use_control_group(None)
    gc.collect()
