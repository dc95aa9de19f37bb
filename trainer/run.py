"""Train the two-tower AlexNet on a shard folder with the paper's recipe.

    python -m trainer.run --shards shards/                        # best device present, paper's recipe
    python -m trainer.run --shards shards/ --gpus 2               # one tower per GPU, as in the paper
    python -m trainer.run --shards shards/ --out runs/a --resume  # continue a stopped or killed run, mid-epoch too
    python -m trainer.run --shards shards/ --workers 4            # 4 data-parallel replicas on Ray Train
    torchrun --nproc-per-node 8 -m trainer.run --shards shards/   # 8 replicas under torchrun

With several replicas (trainer/launch.py starts them) --batch-size is the global batch, split evenly;
gradients are averaged by torch DDP, and rank 0 alone writes the run folder.

The run folder holds config.json (the resolved config and git commit), metrics.jsonl (one line per
logged step and per epoch), TensorBoard's event files (`tensorboard --logdir runs/`), checkpoint.pt
and checkpoint-previous.pt (with the class names, normalisation and preprocessing settings that
trainer.evaluate and trainer.predict need), kernels.png (conv1, per tower) and curves.png; .lock
while a run holds it.

SIGTERM or SIGINT (a preemption, Ctrl-C): the step finishes, a checkpoint is written, and the run
exits with status 128 + the signal's number; --resume continues with the batches it would have had.

The modules, in the order data flows: config (flags, refusals) -> launch (one process, Ray Train,
torchrun; the run folder's lock) -> loop (the epochs) -> checkpoint, reports (metrics, TensorBoard,
pictures); stop and ranks are what the loop asks when to stop and what the replicas exchange.
"""
import logging
import os
import sys

from trainer.config import parse_args


def main(argv=None):
    config = parse_args(argv, doc=__doc__)
    # one voice: under torchrun the other ranks log warnings and errors only
    level = logging.INFO if int(os.environ.get("RANK", 0)) == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s")
    from trainer.launch import launch

    return launch(config)


if __name__ == "__main__":
    sys.exit(main())
