"""The two-tower AlexNet against the paper's arithmetic and an independent fused (grouped-conv) net."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainer.model import AlexNet
from trainer.recipes import LAYERS, RECIPES, param_groups


def test_parameter_count_is_the_papers():
    assert sum(p.numel() for p in AlexNet(num_classes=1000).parameters()) == 60_965_224


def test_shapes_after_every_stage():
    model = AlexNet(num_classes=10).eval()
    seen = {}
    for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"):
        layer = getattr(model.towers[0], name)
        layer.register_forward_hook(lambda m, i, o, name=name: seen.update({name: (tuple(i[0].shape), tuple(o.shape))}))
    out = model(torch.randn(2, 3, 227, 227))
    assert out.shape == (2, 10)
    assert seen["conv1"] == ((2, 3, 227, 227), (2, 48, 55, 55))
    assert seen["conv2"] == ((2, 48, 27, 27), (2, 128, 27, 27))  # pooled 55 -> 27
    assert seen["conv3"] == ((2, 256, 13, 13), (2, 192, 13, 13))  # pooled 27 -> 13, both towers' maps
    assert seen["conv4"][1] == (2, 192, 13, 13) and seen["conv5"][1] == (2, 128, 13, 13)
    assert seen["fc6"] == ((2, 2 * 128 * 6 * 6), (2, 2048))  # pooled 13 -> 6, both towers
    assert seen["fc7"] == ((2, 4096), (2, 2048)) and seen["fc8"] == ((2, 4096), (2, 5))


def numpy_lrn(x, n, k, alpha, beta):
    """b_i = a_i / (k + alpha * sum_{j=max(0,i-n/2)}^{min(N-1,i+n/2)} a_j^2)^beta, section 3.3's formula."""
    expected = np.empty_like(x)
    for i in range(x.shape[1]):
        lo, hi = max(0, i - n // 2), min(x.shape[1] - 1, i + n // 2)
        expected[:, i] = x[:, i] / (k + alpha * (x[:, lo:hi + 1] ** 2).sum(1)) ** beta
    return expected


@pytest.mark.parametrize("recipe, k, alpha", [
    ("paper", 2.0, 1e-4),  # the text: alpha times the sum
    ("cuda-convnet2", 2.0, 1e-4 / 5),  # layer.py: scale /= size; minDiv 2
    ("caffe", 1.0, 1e-4 / 5),  # LRNParameter: k 1, alpha / local_size
    ("torch", 2.0, 1e-4),  # PyTorch's init, the paper's LRN
])
def test_lrn_is_each_sources_formula(recipe, k, alpha):
    a = torch.randn(2, 7, 3, 4, dtype=torch.float64) * 30
    expected = numpy_lrn(a.numpy(), 5, k, alpha, 0.75)
    np.testing.assert_allclose(AlexNet(num_classes=4, recipe=recipe).lrn(a).numpy(), expected, rtol=1e-12)


SOURCES = {  # per layer (weight std, bias), as each source writes them
    "paper": {n: (0.01, b) for n, b in zip(LAYERS, (0, 1, 0, 1, 1, 1, 1, 0))},
    "cuda-convnet2": {n: (w, b) for n, w, b in zip(LAYERS, (0.01, 0.01, 0.03, 0.03, 0.03, 0.01, 0.01, 0.01),
                                                    (0, 1, 0, 1, 1, 1, 1, 0))},
    "caffe": {n: (w, b) for n, w, b in zip(LAYERS, (0.01, 0.01, 0.01, 0.01, 0.01, 0.005, 0.005, 0.01),
                                            (0, 0.1, 0, 0.1, 0.1, 0.1, 0.1, 0))},
}


@pytest.mark.parametrize("recipe", SOURCES)
def test_each_references_initialisation(recipe):
    torch.manual_seed(0)
    model = AlexNet(num_classes=1000, recipe=recipe)
    for tower in model.towers:
        for name, (std, bias) in SOURCES[recipe].items():
            w = getattr(tower, name).weight.double().flatten()
            # the sample std of n normals is within 5 of its standard errors, std / sqrt(2n), of the true one
            assert abs(w.std().item() - std) < 5 * std / (2 * len(w)) ** 0.5, name
            assert abs(w.mean().item()) < 5 * std / len(w) ** 0.5, name
            assert torch.all(getattr(tower, name).bias == torch.tensor(bias, dtype=torch.float32)), name


def test_torch_recipe_keeps_pytorchs_init():
    torch.manual_seed(0)
    fc6 = AlexNet(num_classes=10, recipe="torch").towers[0].fc6
    bound = 1 / fc6.in_features ** 0.5  # nn.Linear's kaiming_uniform(a=sqrt(5)): U(-bound, bound), its bias too
    assert fc6.weight.abs().max() <= bound and fc6.weight.abs().max() > 0.99 * bound
    assert fc6.bias.abs().max() <= bound and len(set(fc6.bias.tolist())) > 1000


@pytest.mark.parametrize("recipe, bias_lr, bias_decay", [("paper", 1, 5e-4), ("cuda-convnet2", 2, 0),
                                                         ("caffe", 2, 0), ("torch", 1, 5e-4)])
def test_optimisers_groups_give_biases_their_lr_and_decay(recipe, bias_lr, bias_decay):
    model = AlexNet(num_classes=10, recipe=recipe)
    optimizer = torch.optim.SGD(param_groups(model, RECIPES[recipe], 0.01, 5e-4), momentum=0.9)
    names = {id(p): name for name, p in model.named_parameters()}
    seen = set()
    for group in optimizer.param_groups:  # the optimiser's own groups, as it steps with them
        for p in group["params"]:
            is_bias = names[id(p)].endswith("bias")
            assert group["lr"] == pytest.approx(0.01 * (bias_lr if is_bias else 1)), names[id(p)]
            assert group["weight_decay"] == (bias_decay if is_bias else 5e-4), names[id(p)]
            seen.add(id(p))
    assert seen == set(names)  # every parameter once


def fused_forward(model, x):
    """The same net as one device would run it fused: grouped convolutions and per-group LRN."""
    t0, t1 = model.towers

    def cat(name, part="weight"):
        return torch.cat([getattr(getattr(t0, name), part), getattr(getattr(t1, name), part)])

    def grouped_lrn(h):  # each tower normalises over its own maps only
        return torch.cat([model.lrn(g) for g in h.chunk(2, dim=1)], dim=1)

    h = F.max_pool2d(grouped_lrn(F.relu(F.conv2d(x, cat("conv1"), cat("conv1", "bias"), stride=4))), 3, 2)
    h = F.max_pool2d(grouped_lrn(F.relu(F.conv2d(h, cat("conv2"), cat("conv2", "bias"), padding=2, groups=2))), 3, 2)
    h = F.relu(F.conv2d(h, cat("conv3"), cat("conv3", "bias"), padding=1))
    h = F.relu(F.conv2d(h, cat("conv4"), cat("conv4", "bias"), padding=1, groups=2))
    h = F.max_pool2d(F.relu(F.conv2d(h, cat("conv5"), cat("conv5", "bias"), padding=1, groups=2)), 3, 2)
    # tower t's pooled conv5 maps are channels [128 t, 128 (t + 1)): flattening keeps tower 0's first
    h = F.relu(F.linear(h.flatten(1), cat("fc6"), cat("fc6", "bias")))
    h = F.relu(F.linear(h, cat("fc7"), cat("fc7", "bias")))
    return F.linear(h, cat("fc8"), cat("fc8", "bias"))


def test_split_equals_fused_outputs_and_gradients():
    """The towers on one device (placing them on two is test_two_gpu_placement_matches_one_device's)."""
    torch.manual_seed(0)
    model = AlexNet(num_classes=7, recipe="torch").double().eval()
    x = torch.randn(3, 3, 227, 227, dtype=torch.float64)
    y = torch.tensor([0, 3, 6])
    F.cross_entropy(model(x), y).backward()
    split_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    F.cross_entropy(fused_forward(model, x), y).backward()
    np.testing.assert_allclose(model(x).detach(), fused_forward(model, x).detach(), rtol=1e-10, atol=1e-12)
    for (name, p), split in zip(model.named_parameters(), split_grads):
        torch.testing.assert_close(split, p.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_every_parameter_gets_a_gradient():
    model = AlexNet(num_classes=10, recipe="torch").train()
    F.cross_entropy(model(torch.randn(2, 3, 227, 227)), torch.tensor([1, 2])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert torch.isfinite(model(torch.randn(2, 3, 227, 227))).all()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 1, reason="needs a CUDA GPU")
def test_two_gpu_placement_matches_one_device():
    torch.manual_seed(0)
    model = AlexNet(num_classes=10).eval()
    x = torch.randn(4, 3, 227, 227)
    expected = model(x)
    pair = ["cuda:0", "cuda:1"] if torch.cuda.device_count() > 1 else ["cuda:0", "cpu"]
    model.place(pair)
    assert [d.type for d in model.devices] == [torch.device(d).type for d in pair]
    torch.testing.assert_close(model(x.to(pair[0])).cpu(), expected, rtol=1e-4, atol=1e-4)
