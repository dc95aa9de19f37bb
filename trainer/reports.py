"""What rank 0 tells people about a run: log lines, metrics.jsonl, TensorBoard events, pictures.

metrics.jsonl is append-only JSON lines: {"kind": "step", epoch, step, loss, lr, img_s, data_wait,
data_wait_max, device_wait, workers} per logged step, {"kind": "epoch", epoch, step, top1, top5,
classes_predicted, lr, workers, train_loss, data_wait, data_wait_max, device_wait, img_s} per epoch,
{"kind": "collapse", epoch, step, why} once if the run stops learning (Trainer.collapsed), {"kind": "final",
epoch, top1_ten_crop, top5_ten_crop} at the end. data_wait: the share of the time the step waited because no
batch was ready; device_wait: the share the host waited for the device, handing a batch over (the steps
queued before it) or at a log step's loss.item() (trainer/waits.py); both averaged over the workers,
data_wait_max the worst worker's.
A resumed run appends; a step it redoes appears again, the later line wins.
"""
import dataclasses
import json
import logging
from pathlib import Path

from trainer.pictures import curves_png, kernels_grid, kernels_png

log = logging.getLogger("trainer")


class Reports:
    def __init__(self, out, config, resume_step=None):
        """resume_step: the step a resumed run continues after (TensorBoard drops its later events)."""
        from torch.utils.tensorboard import SummaryWriter

        self.out = Path(out)
        self.metrics = self.out / "metrics.jsonl"
        self.board = SummaryWriter(self.out, purge_step=None if resume_step is None else resume_step + 1)
        if resume_step is None:
            self.metrics.unlink(missing_ok=True)
            self._hparams(config)

    def _write(self, **fields):
        with open(self.metrics, "a") as f:
            f.write(json.dumps(fields) + "\n")

    def _hparams(self, config):
        """The run's config as TensorBoard hparams, its metrics the val errors logged each epoch."""
        from torch.utils.tensorboard.summary import hparams

        values = {k: v for k, v in dataclasses.asdict(config).items() if k != "resume"}
        for summary in hparams(values, {"val/top1_error": 0.0, "val/top5_error": 0.0}):
            self.board.file_writer.add_summary(summary)

    def step(self, epoch, step, epoch_step, steps, loss, lr, img_s, data_wait, data_wait_max, device_wait, workers,
             eta):
        spread = f" (worst worker {100 * data_wait_max:.1f}%)" if workers > 1 else ""
        log.info("epoch %d step %d/%d: loss %.4f, lr %.2g, %.1f img/s, data wait %.1f%%%s, device wait %.1f%%, "
                 "ETA %.0fs", epoch, epoch_step, steps, loss, lr, img_s, 100 * data_wait, spread, 100 * device_wait,
                 eta)
        self._write(kind="step", epoch=epoch, step=step, loss=loss, lr=lr, img_s=img_s, data_wait=data_wait,
                    data_wait_max=data_wait_max, device_wait=device_wait, workers=workers)
        for name, figure in (("loss", loss), ("lr", lr), ("img_s", img_s), ("data_wait", data_wait),
                             ("data_wait_max", data_wait_max), ("device_wait", device_wait)):
            self.board.add_scalar(f"train/{name}", figure, step)

    def epoch(self, epoch, step, stats, top1, top5, predicted, lr, workers):
        val = "no val split" if top1 is None else f"val top-1 error {100 * top1:.2f}%, top-5 error {100 * top5:.2f}%"
        spread = f" (worst worker {100 * stats['data_wait_max']:.1f}%)" if workers > 1 else ""
        log.info("epoch %d: train loss %.4f, %s, %.1f img/s, data wait %.1f%%%s, device wait %.1f%%", epoch,
                 stats["train_loss"], val, stats["img_s"], 100 * stats["data_wait"], spread, 100 * stats["device_wait"])
        self._write(kind="epoch", epoch=epoch, step=step, top1=top1, top5=top5, classes_predicted=predicted, lr=lr,
                    workers=workers, **stats)
        self.board.add_scalar("train/epoch_loss", stats["train_loss"], epoch)
        if top1 is not None:
            self.board.add_scalar("val/top1_error", top1, epoch)
            self.board.add_scalar("val/top5_error", top5, epoch)
            self.board.add_scalar("val/classes_predicted", predicted, epoch)

    def collapse(self, epoch, step, why):
        advice = ("it is not learning. Try a lower --lr, or another --recipe (docs/training.md, \"Recipes\": the paper's "
                  "text collapses where caffe's learns)")
        log.warning("the run has collapsed: %s: %s", why, advice)
        self._write(kind="collapse", epoch=epoch, step=step, why=why)
        self.board.add_text("train/collapse", f"{why}: {advice}", step)

    def final(self, epoch, top1, top5):
        log.info("ten-crop: val top-1 error %.2f%%, top-5 error %.2f%%", 100 * top1, 100 * top5)
        self._write(kind="final", epoch=epoch, top1_ten_crop=top1, top5_ten_crop=top5)
        self.board.add_scalar("val/top1_error_ten_crop", top1, epoch)
        self.board.add_scalar("val/top5_error_ten_crop", top5, epoch)

    def pictures(self, model, epoch, steps_per_epoch):
        """kernels.png (conv1 of each tower) and curves.png (loss per step, errors and lr per epoch)."""
        towers = [t.conv1.weight for t in model.towers]
        kernels_png(self.out / "kernels.png", towers)
        self.board.add_image("conv1/kernels", kernels_grid(towers), epoch, dataformats="HWC")
        steps, epochs = [], []
        with open(self.metrics) as f:
            for m in map(json.loads, f):
                if m["kind"] == "step":
                    steps.append((m["step"] / steps_per_epoch, m["loss"]))
                elif m["kind"] == "epoch":
                    epochs.append((m["epoch"], m["top1"], m["top5"], m["lr"]))
        curves_png(self.out / "curves.png", steps, epochs)

    def close(self):
        self.board.close()  # events are flushed however the run ends
