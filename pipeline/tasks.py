"""The preprocessing job's work, spread: as Ray tasks of one CPU each on the cluster this process is
connected to, or on a pool of processes of this machine (trainer.gpu_check makes its shards so)."""
import socket


class JobFailed(Exception):
    """The job ran but its result must not be used; the message says why and what to do."""


def unreachable(address, timeout=10) -> str | None:
    """Why no Ray cluster can be reached at `address` (its GCS's "host:port"), or None. ray.init waits on
    such an address for minutes and says nothing useful; this says it at once. Other forms ("auto",
    "ray://host:port") are left to Ray."""
    host, _, port = address.rpartition(":")
    if not host or "://" in address or not port.isdigit():
        return None
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        return (f"no Ray cluster answers at {address} ({e.strerror or e}): start one there (`ray start --head`), "
                f"or correct --address or $RAY_ADDRESS")
    return None


def parallel(fn, calls, processes=None):
    """Yield (key, fn(*args)) for every (key, args) of `calls`, as they finish: on Ray, or with `processes`
    on that many processes. Each is submitted as `calls` yields it (an iterable: a generator's next call
    is made while the tasks before it run). An OSError or JobFailed in one cancels the others and is
    raised as it is."""
    return (_on_processes if processes else _on_ray)(fn, calls, processes)


def _on_ray(fn, calls, _):
    import ray

    task = ray.remote(num_cpus=1, scheduling_strategy="SPREAD")(fn)  # every node reads and writes
    pending = {task.remote(*args): key for key, args in calls}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            key = pending.pop(ref)  # finished: cancelling it too crashes Ray 2.60's driver (a failed check)
            try:
                yield key, ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                cause = getattr(e, "cause", None)
                if not isinstance(cause, (OSError, JobFailed)):
                    raise
                # the others' references stay alive, with their tracebacks: Ray says nothing of their errors
                for other in pending:
                    ray.cancel(other)
                raise cause from None


def _on_processes(fn, calls, processes):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending = {pool.submit(fn, *args): key for key, args in calls}
        try:
            for future in as_completed(pending):
                yield pending[future], future.result()
        finally:  # a failure stops the rest
            for future in pending:
                future.cancel()
