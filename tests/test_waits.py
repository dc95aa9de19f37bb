"""trainer/waits.py: in the real training loop on the CPU beside a simulated asynchronous device, and
with CUDA events on a GPU."""
import json
import time

import pytest
import torch

from trainer.config import Config
from trainer.loop import Trainer
from trainer.waits import Waits

STEPS, BATCH = 5, 4
DEVICE_S = PIPELINE_S = 0.2  # planted: a step's time on the device, a batch's time in the pipeline


class SimulatedDevice:
    """An asynchronous device on the host's clock: a step queued on it returns at once and is done
    `seconds` later; a marker is the time the device reaches it (the clock the trainer's Waits read)."""

    def __init__(self):
        self.busy_until = 0.0

    def queue(self, seconds):
        self.busy_until = max(time.perf_counter(), self.busy_until) + seconds

    def mark(self) -> float:
        return max(time.perf_counter(), self.busy_until)

    def seconds(self, start, end) -> float:
        return end - start

    def finish(self):
        """The host waits for the device's queue, as DALI's hand-over of a batch does on a GPU."""
        time.sleep(max(0.0, self.busy_until - time.perf_counter()))


def test_waiting_for_the_device_is_device_wait_and_a_slow_pipeline_is_data_wait(local_shards, tmp_path, caplog):
    trainer = Trainer(Config(shards=str(local_shards), out=str(tmp_path / "run"), batch_size=BATCH, recipe="torch",
                             device="cpu", steps_per_epoch=STEPS, log_every=STEPS, verify_shards=False))
    device = SimulatedDevice()
    trainer.waits = Waits(device)
    ready = [next(trainer.batches) for _ in range(STEPS)]  # real batches, drawn before: the pipeline's own time is 0

    def epoch(step_s, pipeline_s) -> dict:
        """One epoch of STEPS steps, each `step_s` on the device, each batch `pipeline_s` in the pipeline;
        -> the epoch's figures, its waits in seconds."""
        def batches():
            for batch in ready:
                time.sleep(pipeline_s)
                device.finish()
                yield batch

        def train_step(images, labels):
            device.queue(step_s)
            return torch.tensor(1.0)

        trainer.batches, trainer.train_step, trainer.epoch_step = batches(), train_step, 0
        stats = trainer.train_epoch()
        elapsed = STEPS * BATCH / stats["img_s"]
        return {**stats, "data_s": stats["data_wait"] * elapsed, "device_s": stats["device_wait"] * elapsed}

    with caplog.at_level("INFO", logger="trainer"):
        behind_the_device = epoch(step_s=DEVICE_S, pipeline_s=0.0)
        behind_the_pipeline = epoch(step_s=0.0, pipeline_s=PIPELINE_S)
    # the first batch comes to an idle device; each later hand-over waits for the step before it
    planted = (STEPS - 1) * DEVICE_S
    assert planted / 2 < behind_the_device["device_s"] <= planted + 0.05
    assert behind_the_device["data_s"] < DEVICE_S / 2
    planted = STEPS * PIPELINE_S
    assert planted <= behind_the_pipeline["data_s"] < planted + 1.0
    assert behind_the_pipeline["device_s"] < 0.01  # the log step's loss.item(): microseconds on the CPU
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["device_wait"] > 0.5 for m in steps] == [True, False]  # the log step's window: the whole epoch
    assert [m["data_wait"] > 0.5 for m in steps] == [False, True]
    lines = [r.getMessage() for r in caplog.records if "device wait" in r.getMessage()]
    assert len(lines) == 2 and all("data wait" in line for line in lines)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer.reports.close()
    board = EventAccumulator(str(tmp_path / "run"))
    board.Reload()
    assert {"train/data_wait", "train/device_wait"} <= set(board.Tags()["scalars"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_events_tell_a_busy_device_from_a_slow_pipeline():
    """CudaClock's events on a real GPU: a step queued as a kernel that keeps the GPU busy for DEVICE_S,
    each hand-over synchronising with the host as DALI's does; then a slow pipeline beside an idle GPU."""
    from trainer.waits import CudaClock

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10 ** 7)  # spins for that many of the GPU's clock cycles
    end.record()
    end.synchronize()
    cycles = int(DEVICE_S / (start.elapsed_time(end) / 1000 / 10 ** 7))
    waits = Waits(CudaClock(torch.device("cuda:0")))

    def batches(pipeline_s, synchronise):
        while True:
            time.sleep(pipeline_s)
            if synchronise:
                torch.cuda.synchronize()
            yield None

    def epoch(step_cycles, pipeline_s, synchronise):
        waits.idle()
        handed = batches(pipeline_s, synchronise)
        for _ in range(STEPS):
            waits.next_batch(handed)
            if step_cycles:
                torch.cuda._sleep(step_cycles)
            waits.stepped()
        torch.cuda.synchronize()
        return waits.read()

    data, device = epoch(cycles, 0.0, synchronise=True)
    planted = (STEPS - 1) * DEVICE_S
    assert planted / 2 < device < planted * 1.5 and data < DEVICE_S / 2
    data, device = epoch(0, PIPELINE_S, synchronise=False)
    planted = STEPS * PIPELINE_S
    assert planted <= data < planted + 1.0 and device < 0.05
