"""The lr rule (trainer/schedule.py) on planted val-error sequences: it cuts on a plateau, never on noise."""
import math

import pytest
import torch

from trainer.schedule import Plateau


def lrs(errors, val_images=1000, patience=2, lr=0.01):
    """The lr after each epoch of `errors`, for weights and for biases at twice their lr."""
    weights, biases = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([{"params": [weights], "lr": lr}, {"params": [biases], "lr": 2 * lr}], momentum=0.9)
    schedule = Plateau(optimizer, factor=0.1, patience=patience, val_images=val_images)
    seen = []
    for error in errors:
        schedule.step(error)
        seen.append([group["lr"] for group in optimizer.param_groups])
    return seen


def noise(error, n=1000):
    return math.sqrt(error * (1 - error) / n)


def test_an_error_that_falls_by_more_than_its_noise_is_never_cut():
    errors = [0.9]
    for _ in range(30):  # each epoch 1.2 of the best's standard errors better: 0.9 -> ~0.5
        errors.append(errors[-1] - 1.2 * noise(errors[-1]))
    assert [w for w, _ in lrs(errors)] == [0.01] * 31


def test_a_slow_fall_within_the_noise_each_epoch_but_beyond_it_within_patience_is_never_cut():
    errors = [0.5]
    for _ in range(20):  # 0.6 of a standard error an epoch: better than the best by its noise every 2 epochs
        errors.append(errors[-1] - 0.6 * noise(0.5))
    assert [w for w, _ in lrs(errors, patience=2)] == [0.01] * 21


def test_noise_around_a_plateau_is_a_plateau_and_cuts_every_patience_epochs():
    jitter = [0.40, 0.40 + 0.5 * noise(0.4), 0.40 - 0.5 * noise(0.4), 0.40 + 0.2 * noise(0.4), 0.40 - 0.9 * noise(0.4)]
    seen = lrs(jitter * 2, patience=2)
    # epoch 1 sets the best; epochs 2-3 are within its noise: cut; 4-5 too: cut; 6-7: cut; 8-9: cut
    expected = [0.01, 0.01, 1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5, 1e-6, 1e-6]
    assert [w for w, _ in seen] == pytest.approx(expected, rel=1e-12)
    assert [b for _, b in seen] == pytest.approx([2 * e for e in expected], rel=1e-12)  # the biases' ratio kept


def test_a_fall_then_a_plateau_cuts_once_the_plateau_has_lasted_patience_epochs():
    errors = [0.8, 0.7, 0.6, 0.5, 0.5, 0.5, 0.42, 0.5, 0.5, 0.5]
    # 0.42 after the cut is an improvement (by 8 points, its noise 1.6): the count starts again there
    assert [w for w, _ in lrs(errors, patience=2)] == pytest.approx(
        [0.01, 0.01, 0.01, 0.01, 0.01, 1e-3, 1e-3, 1e-3, 1e-4, 1e-4], rel=1e-12)


def test_the_same_fall_on_a_small_val_is_noise():
    # 1 point an epoch is 6 standard errors on ImageNet's 50,000 val images, 0.6 on 360 digits
    errors = [0.30, 0.29, 0.28, 0.27, 0.26]
    assert [w for w, _ in lrs(errors, val_images=50_000)] == [0.01] * 5
    assert [w for w, _ in lrs(errors, val_images=360)][-1] < 0.01


def test_its_state_resumes_and_reads_reduce_lr_on_plateaus():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.01)
    old = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)  # what checkpoints held before this rule
    old.step(0.5)
    old.step(0.6)
    schedule = Plateau(optimizer, factor=0.1, patience=2, val_images=100)
    schedule.load_state_dict(old.state_dict())
    assert (schedule.best, schedule.num_bad_epochs) == (0.5, 1)
    schedule.step(0.5)  # the second epoch without an improvement
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
