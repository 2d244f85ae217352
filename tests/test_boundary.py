"""The step-boundary rules alone: when every rank stops, checkpoints, or stops because the loss diverged."""

import math
import os

import pytest
import torch
import torch.distributed as dist

from pipeline.boundary import NonFiniteLoss, StepBoundary
from pipeline.distributed import run_local_ranks

CPU = torch.device("cpu")
FINITE = torch.tensor(2.3)


class Signals:
    received = None
    name = ""


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def boundary(**kw):
    return StepBoundary(Signals(), CPU, **kw)


def test_a_stop_signal_stops_at_the_next_step_and_at_once_at_the_last_step_of_an_epoch():
    b = boundary()
    assert not b.after_step(1, FINITE).stop
    b.signals.received, b.signals.name = 1.0, "SIGUSR2"
    assert not b.after_step(2, FINITE).stop  # its reduction is in flight during step 3
    assert b.after_step(3, FINITE).stop  # within 2 steps of the signal
    last = boundary()
    last.signals.received = 1.0
    assert last.after_step(7, FINITE, last_in_epoch=True).stop  # no decision left in flight at an epoch's end


def test_blocking_agrees_within_the_step():
    b = boundary(blocking=True)
    b.signals.received = 1.0
    assert b.after_step(1, FINITE).stop


def test_every_steps_checkpoints_exactly_on_the_step_and_every_minutes_one_step_after_it_is_due():
    b = boundary(every_steps=5)
    assert [s for s in range(1, 16) if b.after_step(s, FINITE).save] == [5, 10, 15]
    clock = Clock()
    b = boundary(every_minutes=1.0, clock=clock)
    b.saved()
    assert not b.after_step(1, FINITE).save
    clock.now = 61.0
    assert not b.after_step(2, FINITE).save  # due now, agreed during step 3
    assert b.after_step(3, FINITE).save
    b.before_save(3, lambda: True)  # as a checkpoint does: what is in flight is read, then it is written
    b.saved()
    assert not b.after_step(4, FINITE).save and not b.after_step(5, FINITE).save


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_the_value():
    b = boundary()
    b.after_step(1, FINITE)
    b.after_step(2, torch.tensor(math.nan))  # read at step 3 (no host sync), agreed during step 4
    b.after_step(3, FINITE)
    with pytest.raises(NonFiniteLoss, match=r"the loss at step 2 is nan\. No checkpoint of it was written"):
        b.after_step(4, FINITE)


def test_no_checkpoint_is_written_after_a_non_finite_loss_or_with_non_finite_weights():
    b = boundary()
    b.after_step(1, FINITE)
    b.after_step(2, torch.tensor(math.inf))
    with pytest.raises(NonFiniteLoss, match="the loss at step 2 is inf"):  # the check before a save is at once
        b.before_save(3, lambda: True)
    b = boundary()
    b.after_step(1, FINITE)
    with pytest.raises(NonFiniteLoss, match="the weights after step 1 hold non-finite values"):
        b.before_save(1, lambda: False)
    b = boundary()
    b.after_step(1, FINITE)
    assert b.before_save(3, lambda: True) is False


def test_too_many_skipped_fp16_steps_in_a_row_stop_the_run():
    b = boundary(max_skipped=3)
    for step, skipped in enumerate([True, True, True, False, True, True, True], start=1):
        b.after_step(step, FINITE, torch.tensor(skipped))  # a step that was not skipped starts the count again
    b.after_step(8, FINITE, torch.tensor(True))  # the 4th in a row: read with its loss at step 9, agreed during 10
    b.after_step(9, FINITE, torch.tensor(False))
    with pytest.raises(NonFiniteLoss, match=r"skipped 4 steps in a row up to step 8 \(more than "
                                            r"train.max_skipped_steps=3\)"):
        b.after_step(10, FINITE, torch.tensor(False))


def test_steps_skipped_up_to_a_checkpoint_are_counted_before_it_is_written():
    b = boundary(max_skipped=1)
    b.after_step(1, FINITE, torch.tensor(True))
    b.after_step(2, FINITE, torch.tensor(True))  # the 2nd in a row, not read yet
    with pytest.raises(NonFiniteLoss, match="skipped 2 steps in a row up to step 2"):
        b.before_save(2, lambda: True)


def _ranks(rank: int, world: int, port: int, out, case: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        b = boundary()
        for step in range(1, 10):
            if case == "signal" and rank == 1 and step == 4:
                b.signals.received = 1.0  # on one rank only
            loss = torch.tensor(math.nan) if case == "nan" and rank == 0 and step == 4 else FINITE
            try:
                if b.after_step(step, loss).stop:
                    out.put((rank, "stop", step))
                    return
            except NonFiniteLoss as err:
                out.put((rank, str(err).split(".")[0], step))
                return
        out.put((rank, "none", 0))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("case, expected", [("signal", ("stop", 5)),
                                            ("nan", ("Stopped: the loss at step 4 is nan", 6))])
def test_every_rank_takes_the_decision_of_one_at_the_same_step(case, expected):
    results = sorted(run_local_ranks(_ranks, 2, case, timeout_s=120))
    assert results == [(0, *expected), (1, *expected)]


def test_a_log_steps_figures_arrive_with_the_next_steps_decision_or_at_once_at_an_epochs_end():
    b = boundary()
    b.after_step(1, FINITE, figures=(0.0125, 0.002))  # a log step: 12.5 ms own, 2 ms waiting for data
    assert b.take_figures() == []  # in flight during step 2
    b.after_step(2, FINITE)
    [got] = b.take_figures()
    assert got.own_ms.tolist() == [12.5] and got.wait_ms.tolist() == [2.0] and b.take_figures() == []
    b.after_step(3, FINITE)
    assert b.take_figures() == []  # not a log step
    b.after_step(4, FINITE, last_in_epoch=True, figures=(0.001, 0.0))
    assert [f.own_ms.tolist() for f in b.take_figures()] == [[1.0]]


def _figure_ranks(rank: int, world: int, port: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        b = boundary()
        seen = []
        for step in range(1, 8):
            b.after_step(step, FINITE, figures=((rank + 1) / 1e3, rank / 1e4) if step % 3 == 0 else None)
            seen += [(step, got.own_ms.tolist(), got.wait_ms.tolist()) for got in b.take_figures()]
        out.put((rank, seen))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_every_rank_gets_every_ranks_figures_at_the_step_after_a_log_step():
    results = sorted(run_local_ranks(_figure_ranks, 3, timeout_s=120))
    expected = [(step, [1.0, 2.0, 3.0], [0.0, 0.1, 0.2]) for step in (4, 7)]
    assert results == [(rank, expected) for rank in range(3)]
