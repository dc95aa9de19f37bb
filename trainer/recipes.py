"""The references a run can follow: how each initialises AlexNet, normalises its responses and trains its biases.

    paper          the paper's text (sections 3.3 and 5)
    cuda-convnet2  Krizhevsky's released configs (akrizhevsky/cuda-convnet2, layers/layers-imagenet-2gpu-model.cfg
                   and layers/layer-params-imagenet-*.cfg; LRN's scale in layer.py)
    caffe          Caffe's bvlc_alexnet (BVLC/caffe models/bvlc_alexnet/train_val.prototxt and readme.md)
    torch          PyTorch's own init, the paper's LRN and update rule

The lr, momentum, weight decay and batch size are the trainer's flags, the same for all (section 5's).
"""
from dataclasses import dataclass

LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
BIASED = ("conv2", "conv4", "conv5", "fc6", "fc7")  # the layers every reference starts with a positive bias


@dataclass(frozen=True)
class Recipe:
    weight_std: dict | None  # {layer: std of its N(0, std) weights}; None: PyTorch's default init
    bias: dict | None  # {layer: its initial bias, every unit}; None: PyTorch's default init
    lrn_k: float  # LRN's k: b = a / (k + alpha' * sum of a^2 over 5 maps)^0.75
    lrn_average: bool  # alpha' = alpha / n, the released code's (and Caffe's, torch's); else alpha, the text's
    bias_lr: float  # a bias's lr as a multiple of the weights'
    bias_decay: bool  # weight decay on the biases too
    inputs: str  # the input scale the reference trains on (pipeline.loader.INPUTS)


def _per_layer(default, **layers):
    return {name: layers.get(name, default) for name in LAYERS}


RECIPES = {
    # section 5: "weights in each layer from a zero-mean Gaussian with standard deviation 0.01 ... biases in the
    # second, fourth, and fifth convolutional layers, as well as in the fully-connected hidden layers, with the
    # constant 1 ... the remaining layers with 0"; "an equal learning rate for all layers"; section 3.3's
    # alpha * sum; section 2's centred raw pixels
    "paper": Recipe(weight_std=_per_layer(0.01), bias={n: float(n in BIASED) for n in LAYERS}, lrn_k=2.0,
                    lrn_average=False, bias_lr=1.0, bias_decay=True, inputs="raw"),
    # initW 0.03 in conv3-5; initB 1 as the paper; epsB = 2 epsW; wc (decay) on weights only; cmrnorm's scale
    # divided by its size (layer.py), minDiv (k) 2
    "cuda-convnet2": Recipe(weight_std=_per_layer(0.01, conv3=0.03, conv4=0.03, conv5=0.03),
                            bias={n: float(n in BIASED) for n in LAYERS}, lrn_k=2.0, lrn_average=True, bias_lr=2.0,
                            bias_decay=False, inputs="raw"),
    # std 0.005 in fc6-7; biases 0.1 where the paper has 1 ("initialization to 1 resulted in flat training
    # loss", readme.md); bias lr_mult 2, decay_mult 0; Caffe's LRN has k 1 and alpha / local_size
    "caffe": Recipe(weight_std=_per_layer(0.01, fc6=0.005, fc7=0.005), bias={n: 0.1 * (n in BIASED) for n in LAYERS},
                    lrn_k=1.0, lrn_average=True, bias_lr=2.0, bias_decay=False, inputs="raw"),
    "torch": Recipe(weight_std=None, bias=None, lrn_k=2.0, lrn_average=False, bias_lr=1.0, bias_decay=True,
                    inputs="standardised"),
}


def param_groups(model, recipe: Recipe, lr: float, weight_decay: float) -> list[dict]:
    """The optimiser's groups: one where the biases train as the weights do, else the weights', then the
    biases' with the recipe's lr multiple and decay (a scheduler's cut keeps their ratio)."""
    if recipe.bias_lr == 1 and recipe.bias_decay:
        return [{"params": list(model.parameters()), "lr": lr, "weight_decay": weight_decay}]
    weights = [p for name, p in model.named_parameters() if not name.endswith("bias")]
    biases = [p for name, p in model.named_parameters() if name.endswith("bias")]
    return [{"params": weights, "lr": lr, "weight_decay": weight_decay},
            {"params": biases, "lr": lr * recipe.bias_lr, "weight_decay": weight_decay if recipe.bias_decay else 0.0}]
