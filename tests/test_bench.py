"""pipeline.bench's measuring: the CPU time it reports is the work done, whatever the wall clock did."""
import time

from pipeline.bench import measure


def batches_of_work(images, cpu_s, idle_s):
    """Endless batches of `images`, each after `cpu_s` of this thread's CPU and `idle_s` asleep."""
    while True:
        start = time.thread_time()
        while time.thread_time() - start < cpu_s:
            pass
        time.sleep(idle_s)
        yield images


def test_cpu_time_an_image_counts_the_work_and_not_the_idle_time():
    per_second, cpu_us = measure(batches_of_work(4, cpu_s=0.002, idle_s=0.04), seconds=0.3, warmup=1)
    # each batch of 4 images took at least 2 ms of CPU (>= 500 us an image) and 42 ms of wall time
    assert cpu_us >= 500
    assert per_second <= 4 / 0.042
    # the sleep is not counted: 500 us of this thread's an image against >= 10,500 us of wall time (the
    # process's other threads would have to keep a core busy all along to reach it)
    assert cpu_us < 1e6 / per_second / 2
