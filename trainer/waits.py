"""Where the host's time between two steps goes: the data wait and the device wait.

Between two steps the host asks the pipeline for the next batch, next(batches). That call blocks
for one of two reasons:
  - data wait: no batch is ready, the pipeline is behind. The device idles: this is the time lost.
  - device wait: the batch is ready, but handing it over waits for the device to finish the steps
    already queued (DALI's iterator synchronises its outputs with the host, and the host runs ahead of
    an asynchronous GPU). The device is busy meanwhile: nothing is lost. The log step's loss.item()
    (`item`), which waits for the device too, is counted here as well.

The split: a marker on the device's queue after each step and another when the batch is handed over.
From the first to the second the device had nothing to do; of the host's time in next(), that gap
(at most all of it) is the data wait, the rest the device wait. The first batch of an epoch follows a
val pass and a checkpoint, during which the device has finished its queue: all of its wait is data wait.

Cost: on CUDA the markers are CUDA events, two records a step (microseconds, no sync), read at log
steps after the host sync that the log line already makes (`loss.item()`). On the CPU the step is
synchronous: the markers are the host's clock, and the device wait is 0 by construction but for the
microseconds of loss.item().
"""
import time

import torch


class HostClock:
    """A device whose work is done when the call that queued it returns: the CPU. Markers are seconds."""

    def mark(self) -> float:
        return time.perf_counter()

    def seconds(self, start, end) -> float:
        return end - start


class CudaClock:
    """A GPU's queue: a marker is a CUDA event recorded on the current stream."""

    def __init__(self, device: torch.device):
        self.device = device

    def mark(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def seconds(self, start, end) -> float:
        # read after a log step's host sync: reached already; with --gpus 2 the loss that synced lives on
        # the other GPU, and this waits for the rest of this one's queue (log steps only)
        end.synchronize()
        return start.elapsed_time(end) / 1000  # ms -> s


def clock_of(device: torch.device):
    return CudaClock(device) if device.type == "cuda" else HostClock()


class Waits:
    """The data wait and device wait of the batches taken through next_batch(), in seconds, summed
    until read()."""

    def __init__(self, clock):
        self.clock = clock
        self.step_end = None  # the marker after the last step; None: the device has finished its queue
        # per batch: (host seconds in next(), the marker after the step before it or None, the marker at hand-over)
        self.pending = []
        self.synced = 0.0  # seconds the host waited in item()

    def next_batch(self, batches):
        started = time.perf_counter()
        batch = next(batches)
        host = time.perf_counter() - started
        self.pending.append((host, self.step_end, self.clock.mark()))
        return batch

    def item(self, tensor: torch.Tensor) -> float:
        """tensor.item(): a host sync, its wait counted as device wait."""
        started = time.perf_counter()
        value = tensor.item()
        self.synced += time.perf_counter() - started
        return value

    def stepped(self):
        """Call after each step is queued."""
        self.step_end = self.clock.mark()

    def idle(self):
        """The device has finished its queue since the last step (a val pass, a checkpoint): the next wait is
        all data wait."""
        self.step_end = None

    def read(self) -> tuple[float, float]:
        """-> (data wait, device wait) in seconds since the last read. Only after a host sync that waited for
        the device's queue (a log step's item()): its markers are then reached."""
        data, device, self.synced = 0.0, self.synced, 0.0
        for host, step_end, handed in self.pending:
            idle = host if step_end is None else min(host, max(0.0, self.clock.seconds(step_end, handed)))
            data, device = data + idle, device + host - idle
        self.pending.clear()
        return data, device
