"""Small seeded models and batches shared by the unit-pruning and MRP-study tests."""
import torch
from torch import nn

from prunelab import models


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model, state):
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


def mlp(activation="tanh", seed=0):
    return models.build("mlp", input_shape=(12,), num_classes=4, hidden=(10, 8),
                        activation=activation, seed=seed).double()


def conv(bn=False, padding="valid", seed=0):
    model = models.build("small_conv", input_shape=(3, 32, 32), num_classes=5, width=0.125,
                         bn=bn, padding=padding, seed=seed).double()
    if bn:  # non-trivial eval statistics
        g = torch.Generator().manual_seed(seed)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))
                m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
                m.weight.data.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))
                m.bias.data.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))
    return model


def batch(shape, n=6, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, *shape, generator=g, dtype=torch.float64),
            torch.randint(0, classes, (n,), generator=g))


MLP_BATCH = batch((12,), n=8, classes=4)
CONV_BATCH = batch((3, 32, 32), n=4, classes=5)
