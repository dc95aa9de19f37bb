"""The paper's two-GPU split AlexNet (section 3, figure 2), with the towers placed on one or two devices.

Each tower:
    conv1  48 x 11x11 stride 4 on the full RGB input   [B, 3, 227, 227] -> [B, 48, 55, 55], ReLU, LRN, pool -> 27
    conv2 128 x 5x5 pad 2 on its own conv1 maps         -> [B, 128, 27, 27], ReLU, LRN, pool -> 13
    conv3 192 x 3x3 pad 1 on BOTH towers' conv2 maps    -> [B, 192, 13, 13], ReLU        (cross-tower link)
    conv4 192 x 3x3 pad 1 on its own conv3 maps         -> [B, 192, 13, 13], ReLU
    conv5 128 x 3x3 pad 1 on its own conv4 maps         -> [B, 128, 13, 13], ReLU, pool -> 6
    fc6  2048 units from BOTH towers' pooled conv5 (2 x 128 x 6 x 6 = 9216), ReLU, dropout 0.5
    fc7  2048 units from BOTH towers' fc6 (4096), ReLU, dropout 0.5
    fc8  its half of the num_classes logits from BOTH towers' fc7 (4096)
Pools are 3x3 stride 2 (overlapping, section 3.4). 60,965,224 parameters with 1000 classes.

Tower t lives on devices[t]; activations cross devices only at the inputs of conv3, fc6, fc7 and
fc8. CUDA kernels are queued asynchronously, so issuing tower 0's and tower 1's layers in turn keeps
both GPUs computing at once. With one device both towers share it.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trainer.recipes import LAYERS, RECIPES


@dataclass(frozen=True)
class LRN:
    """Local response normalisation, section 3.3: b = a / (k + alpha * sum of a^2 over n adjacent maps)^beta;
    average: alpha / n instead of alpha, as Krizhevsky's released code and Caffe compute it (5 times less)."""
    n: int = 5
    k: float = 2.0
    alpha: float = 1e-4
    beta: float = 0.75
    average: bool = False

    def __call__(self, x):
        # torch divides its alpha by n (it averages the squares); the paper's text sums them
        alpha = self.alpha if self.average else self.alpha * self.n
        return F.local_response_norm(x, self.n, alpha=alpha, beta=self.beta, k=self.k)


class Tower(nn.Module):
    def __init__(self, classes: int, dropout: float):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 48, 11, stride=4)
        self.conv2 = nn.Conv2d(48, 128, 5, padding=2)
        self.conv3 = nn.Conv2d(256, 192, 3, padding=1)
        self.conv4 = nn.Conv2d(192, 192, 3, padding=1)
        self.conv5 = nn.Conv2d(192, 128, 3, padding=1)
        self.fc6 = nn.Linear(2 * 128 * 6 * 6, 2048)
        self.fc7 = nn.Linear(2 * 2048, 2048)
        self.fc8 = nn.Linear(2 * 2048, classes)
        self.dropout = nn.Dropout(dropout)


class AlexNet(nn.Module):
    def __init__(self, num_classes=1000, dropout=0.5, recipe="paper", devices=None):
        """recipe: the name of a reference in trainer/recipes.py, whose init and LRN the net takes.
        devices: one device for both towers or a pair."""
        super().__init__()
        if recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, not {recipe!r}")
        recipe = RECIPES[recipe]
        half = (num_classes + 1) // 2  # tower 0's share of the logits
        self.towers = nn.ModuleList([Tower(half, dropout), Tower(num_classes - half, dropout)])
        self.lrn = LRN(k=recipe.lrn_k, average=recipe.lrn_average)
        for tower in self.towers:
            for name in LAYERS:
                layer = getattr(tower, name)
                if recipe.weight_std is not None:
                    nn.init.normal_(layer.weight, 0.0, recipe.weight_std[name])
                if recipe.bias is not None:
                    nn.init.constant_(layer.bias, recipe.bias[name])
        if devices is not None:
            self.place(devices)

    def place(self, devices):
        """Tower t on devices[t]; a single device (or a one-element list) takes both towers."""
        if isinstance(devices, (str, torch.device)) or len(devices) == 1:
            devices = [devices if isinstance(devices, (str, torch.device)) else devices[0]] * 2
        for tower, device in zip(self.towers, devices):
            tower.to(device)
        return self

    @property
    def devices(self):
        return [tower.conv1.weight.device for tower in self.towers]

    def forward(self, x):
        """x: [B, 3, 227, 227] on either device -> logits [B, num_classes] on the first device."""
        d0, d1 = self.devices
        a = [x.to(d0, non_blocking=True), x.to(d1, non_blocking=True)]
        a = [F.max_pool2d(self.lrn(F.relu(t.conv1(h))), 3, 2) for t, h in zip(self.towers, a)]
        a = [F.max_pool2d(self.lrn(F.relu(t.conv2(h))), 3, 2) for t, h in zip(self.towers, a)]
        a = [F.relu(t.conv3(h)) for t, h in zip(self.towers, self._exchange(a))]
        a = [F.relu(t.conv4(h)) for t, h in zip(self.towers, a)]
        a = [F.max_pool2d(F.relu(t.conv5(h)), 3, 2).flatten(1) for t, h in zip(self.towers, a)]
        a = [t.dropout(F.relu(t.fc6(h))) for t, h in zip(self.towers, self._exchange(a))]
        a = [t.dropout(F.relu(t.fc7(h))) for t, h in zip(self.towers, self._exchange(a))]
        a = [t.fc8(h) for t, h in zip(self.towers, self._exchange(a))]
        return torch.cat([a[0], a[1].to(d0, non_blocking=True)], dim=1)

    def _exchange(self, a):
        """Each tower's input: both towers' maps, tower 0's first, on that tower's device."""
        return [torch.cat([a[0].to(d, non_blocking=True), a[1].to(d, non_blocking=True)], dim=1)
                for d in self.devices]
