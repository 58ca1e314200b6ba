"""dynconv.param_groups: weight decay on kernels and banks, none on biases, norms and routers."""

import pytest
import torch
from torch import nn

import dynconv
from dynconv import DynamicCNN, DynamicConv2d


def _ids(group):
    return {id(p) for p in group["params"]}


def test_groups_partition_the_trainable_parameters():
    model = DynamicCNN(num_experts=3)
    model.head.bias.requires_grad_(False)
    decay, no_decay = dynconv.param_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert _ids(decay) | _ids(no_decay) == trainable
    assert not _ids(decay) & _ids(no_decay)
    assert len(decay["params"]) == len(_ids(decay))
    conv = model.stages[0].conv
    assert id(conv.weight) in _ids(decay)  # the kernel bank
    assert id(model.stem[0].weight) in _ids(decay) and id(model.head.weight) in _ids(decay)
    assert all(id(p) in _ids(no_decay) for p in conv.router.parameters())
    assert id(model.stages[0].bn.weight) in _ids(no_decay)


def test_bias_bank_and_router_option():
    conv = DynamicConv2d(4, 6, 3, num_experts=2)
    decay, no_decay = dynconv.param_groups(conv)
    assert id(conv.bias) in _ids(no_decay) and conv.bias.ndim == 2
    decay, _ = dynconv.param_groups(conv, decay_routers=True)
    assert id(conv.router.fc1.weight) in _ids(decay)
    assert id(conv.router.fc1.bias) not in _ids(decay)  # 1-D: never decayed


def test_works_with_an_optimiser_and_rejects_bad_arguments():
    model = DynamicCNN(num_experts=2, widths=(8, 8, 8), stem_channels=4)
    optimiser = torch.optim.AdamW(dynconv.param_groups(model, 0.05), lr=1e-3)
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    optimiser.step()
    with pytest.raises(ValueError, match="weight_decay"):
        dynconv.param_groups(model, -1.0)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        dynconv.param_groups([nn.Linear(2, 2)])
