"""The lr rule of section 5, "divide the learning rate by 10 when the validation error rate stopped improving
with the current learning rate", written down so that noise is not taken for a plateau.

An epoch improves on the best val error only if it is lower by more than the best's own noise: one binomial
standard error, sqrt(e (1 - e) / n) over n val images (0.22 points at 40 % on ImageNet's 50,000; 1.6 points at
10 % on 360). After `patience` epochs in a row without such an improvement the lr is divided by 10, and the
count starts again: a hundredfold cut takes 2 x patience epochs without one, and an error that falls by
more than its noise within every `patience` epochs is never cut. Without a val split the training loss drives it,
with torch's relative threshold (1e-4).
"""
import math


class Plateau:
    """Divides every param group's lr by 1/factor after `patience` epochs in a row without an improvement."""

    def __init__(self, optimizer, factor: float, patience: int, val_images: int):
        """val_images: n, the size of val that the errors are measured on; 0: the figures are training losses."""
        self.optimizer, self.factor, self.patience, self.val_images = optimizer, factor, patience, val_images
        self.best, self.num_bad_epochs = math.inf, 0

    def improves(self, figure: float) -> bool:
        if not math.isfinite(self.best):
            return True
        if not self.val_images:
            return figure < self.best * (1 - 1e-4)
        return figure < self.best - math.sqrt(self.best * (1 - self.best) / self.val_images)

    def step(self, figure: float):
        """After an epoch: figure, its val top-1 error (or training loss)."""
        if self.improves(figure):
            self.best, self.num_bad_epochs = figure, 0
        else:
            self.num_bad_epochs += 1
        if self.num_bad_epochs >= self.patience:
            for group in self.optimizer.param_groups:
                group["lr"] *= self.factor
            self.num_bad_epochs = 0

    def state_dict(self) -> dict:
        return {"best": self.best, "num_bad_epochs": self.num_bad_epochs}

    def load_state_dict(self, state: dict):
        """Also a torch ReduceLROnPlateau's state (checkpoints from before this rule): the same two keys."""
        self.best, self.num_bad_epochs = state["best"], state["num_bad_epochs"]
