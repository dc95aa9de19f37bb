"""trainer/checkpoint.py's Writer: the write off the step's path, and a crash during it."""
import os
import signal
import subprocess
import sys

import torch

from conftest import REPO, wait_for
from trainer import checkpoint


def test_the_background_write_holds_the_state_at_save_and_the_next_save_waits_for_it(tmp_path):
    weights = torch.zeros(1000)
    writer = checkpoint.Writer()
    writer.save(tmp_path, {"model": {"w": weights}, "epoch": 1, "step": 10, "classes": ["a"]})
    weights += 1  # the next step, in place, while the write may still be going on
    writer.save(tmp_path, {"model": {"w": weights}, "epoch": 2, "step": 20, "classes": ["a"]})
    writer.wait()
    latest, previous = (checkpoint.read(tmp_path / name) for name in (checkpoint.CHECKPOINT, checkpoint.PREVIOUS))
    assert (latest["step"], previous["step"]) == (20, 10)
    assert torch.equal(previous["model"]["w"], torch.zeros(1000))
    assert torch.equal(latest["model"]["w"], torch.ones(1000))


# A checkpoint whose pickling stops half-way: an object in the state that sleeps when torch.save reaches it
STALLED = """
import sys, time, torch
from trainer import checkpoint

class Stall:
    def __reduce__(self):
        open(sys.argv[1] + "/stalled", "w").close()
        time.sleep(600)
        return (int, ())

writer = checkpoint.Writer()
writer.save(sys.argv[1], {"model": {"w": torch.zeros(10)}, "epoch": 1, "step": 10, "classes": ["a"]})
writer.wait()
writer.save(sys.argv[1], {"model": {"w": torch.ones(1 << 20)}, "epoch": 2, "step": 20, "classes": ["a"],
                          "stall": Stall()})
time.sleep(600)  # the steps going on
"""


def test_a_crash_during_the_background_write_leaves_the_last_good_checkpoint(tmp_path):
    job = subprocess.Popen([sys.executable, "-c", STALLED, str(tmp_path)], cwd=REPO,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        wait_for(lambda: (tmp_path / "stalled").exists() or job.poll() is not None, timeout=120)
        assert job.poll() is None and (tmp_path / checkpoint.TEMPORARY).exists()  # killed with the write half done
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait()
    state = checkpoint.read_latest(tmp_path)
    assert state["step"] == 10 and torch.equal(state["model"]["w"], torch.zeros(10))
