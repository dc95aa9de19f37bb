"""How data-parallel training scales here: img/s of 1 and of N Ray Train workers, as a ratio of linear.

    python -m trainer.worker_scaling --shards shards/                            # 1 vs 2 workers, one core each
    python -m trainer.worker_scaling --shards shards/ --workers 1 2 4 --batch-per-worker 64 --device cuda

Each count is one `python -m trainer.run --workers N --cpus-per-worker 1` (on the CPU each worker
keeps to a core of its own, its DALI threads included; Ray's own processes are not confined), with
the same batch per worker (weak scaling: the global batch grows with N, as it does when GPUs are
added; 64 a worker is the paper's 128 at 2 workers) for --steps steps, one log line a step; img/s is
over the steps after the first --warmup (start-up, first allocations), and the best of --repeats
runs taken in turn (1, 2, 1, 2, ...: a shared machine's slow spells hit both counts alike). Linear
is N times the 1-worker rate. The projected rows extend the measured per-step cost of synchronising to more workers with the
ring all-reduce's 2(N-1)/N volume per worker.

Beside them, what this machine gives 2 workers that never talk: two one-process runs at once, each
on a core of its own. What 2 DDP workers reach of that is the cost of data parallelism itself; what
that reaches of linear is the cost of sharing the machine (memory bandwidth, caches, Ray's processes).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from pipeline.cli import HelpFormatter, add_device


def rate(out: Path, warmup: int, global_batch: int) -> float:
    """img/s over the logged steps after `warmup`: each line's img_s is one step's batch over its time."""
    with open(out / "metrics.jsonl") as f:
        rates = [m["img_s"] for m in map(json.loads, f) if m["kind"] == "step" and m["step"] > warmup]
    return len(rates) * global_batch / sum(global_batch / r for r in rates)


def command(args, out: Path, batch: int) -> list[str]:
    cmd = [sys.executable, "-m", "trainer.run", "--shards", args.shards, "--out", str(out), "--batch-size", str(batch),
           "--epochs", "1", "--steps-per-epoch", str(args.steps), "--log-every", "1", "--no-ten-crop",
           "--no-verify-shards", *args.trainer_args]
    return cmd + (["--device", args.device] if args.device else [])


def measure(args, workers: int, folder: Path) -> float:
    out = folder / f"workers-{workers}"
    batch = args.batch_per_worker * workers
    cmd = command(args, out, batch) + ["--workers", str(workers), "--cpus-per-worker", "1"]
    print(f"{workers} worker(s), global batch {batch}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"the {workers}-worker run failed ({done.returncode}):\n{(done.stdout + done.stderr)[-4000:]}")
    measured = rate(out, args.warmup, batch)
    print(f"  {measured:.2f} img/s", file=sys.stderr, flush=True)
    return measured


def apart(args, folder: Path) -> float:
    """img/s of two one-process runs at once, each kept to a core of its own: two workers that never talk."""
    cores, runs = sorted(os.sched_getaffinity(0))[:2], []
    print(f"2 one-process runs at once on cores {cores}, batch {args.batch_per_worker} each", file=sys.stderr, flush=True)
    for core in cores:
        out = folder / f"apart-{core}"
        job = subprocess.Popen(command(args, out, args.batch_per_worker), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                               preexec_fn=lambda core=core: os.sched_setaffinity(0, [core]))
        runs.append((job, out))
    for job, _ in runs:
        if job.wait():
            sys.exit(f"a one-process run failed ({job.returncode}):\n{job.stderr.read()[-4000:]}")
    measured = sum(rate(out, args.warmup, args.batch_per_worker) for _, out in runs)
    print(f"  {measured:.2f} img/s", file=sys.stderr, flush=True)
    return measured


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m trainer.worker_scaling", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--shards", default="shards", help="a folder written by jobs/preprocess.py")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to measure; 1 first")
    p.add_argument("--batch-per-worker", type=int, default=64, help="images per step of each worker")
    p.add_argument("--steps", type=int, default=8, help="steps per run; the train split must hold that many")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the rate")
    p.add_argument("--repeats", type=int, default=2, help="runs of each count, in turn; the best counts")
    p.add_argument("--project", type=int, nargs="*", default=[4, 8], help="worker counts to project to")
    add_device(p, default_help="the cluster's: cuda where its nodes have GPUs")
    p.add_argument("trainer_args", nargs="*", help="after --: more trainer.run flags (--address, --recipe ...)")
    args = p.parse_args(argv)
    if args.workers[0] != 1:
        p.error("--workers must start with 1: the other counts are compared with one worker")
    if args.steps <= args.warmup:
        p.error("--steps must exceed --warmup")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a private Ray keeps to 127.0.0.1
    rates, alone = {n: 0.0 for n in args.workers}, 0.0
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="worker-scaling-") as folder:
            for n in args.workers:
                rates[n] = max(rates[n], measure(args, n, Path(folder)))
            if len(os.sched_getaffinity(0)) >= 2:
                alone = max(alone, apart(args, Path(folder)))
    one = rates[1]
    print(f"\n{'workers':>7}  {'global batch':>12}  {'img/s':>9}  {'ratio to linear':>15}")
    for n, r in rates.items():
        print(f"{n:>7}  {n * args.batch_per_worker:>12}  {r:>9.2f}  {r / (n * one):>15.3f}  measured")
    if alone:
        b = 2 * args.batch_per_worker
        print(f"{'2 apart':>7}  {b:>12}  {alone:>9.2f}  {alone / (2 * one):>15.3f}  measured: two one-process runs "
              f"at once, no communication")
    if alone and 2 in rates:
        print(f"2 DDP workers reach {rates[2] / alone:.3f} of the two runs apart: the cost of data parallelism itself")
    if 2 in rates:  # the per-step cost two workers add, grown with the all-reduce's volume per worker
        step = args.batch_per_worker / one
        extra = 2 * args.batch_per_worker / rates[2] - step  # 2(N-1)/N = 1 at N = 2
        for n in args.project:
            r = n * args.batch_per_worker / (step + extra * 2 * (n - 1) / n)
            print(f"{n:>7}  {n * args.batch_per_worker:>12}  {r:>9.2f}  {r / (n * one):>15.3f}  projected")


if __name__ == "__main__":
    main()
