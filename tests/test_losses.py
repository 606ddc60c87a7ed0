"""Loss math against hand computation."""

import math

import torch
import torch.nn.functional as F

from mmgen.methods.losses import gather_keeping_local_grad, retrieval_recall, symmetric_infonce
from mmgen.methods.optim import Optim, lr_factor


def test_symmetric_infonce_matches_a_hand_computation():
    text = F.normalize(torch.randn(4, 8), dim=-1)
    image = F.normalize(torch.randn(4, 8), dim=-1)
    scale = torch.tensor(math.log(1 / 0.07))
    s = 1 / 0.07
    t2i = i2t = 0.0
    for i in range(4):
        row = [s * float(text[i] @ image[j]) for j in range(4)]
        col = [s * float(image[i] @ text[j]) for j in range(4)]
        t2i += -row[i] + math.log(sum(math.exp(v) for v in row))
        i2t += -col[i] + math.log(sum(math.exp(v) for v in col))
    expected = (t2i / 4 + i2t / 4) / 2
    assert abs(float(symmetric_infonce(text, image, scale)) - expected) < 1e-4


def test_global_batch_keeps_the_gradient_of_the_local_shard_only():
    local = torch.randn(2, 3, requires_grad=True)
    gathered = torch.stack([torch.randn(2, 3), local.detach(), torch.randn(2, 3)])  # rank 1 of 3
    joined = gather_keeping_local_grad(local, gathered, rank=1)
    assert joined.shape == (6, 3)
    assert torch.equal(joined[2:4], local)
    joined.sum().backward()
    assert torch.equal(local.grad, torch.ones(2, 3))
    assert gather_keeping_local_grad(local, local, rank=0) is local  # one process


def test_recall_at_k():
    sims = torch.tensor([[0.9, 0.1, 0.0, 0.0], [0.1, 0.8, 0.3, 0.0], [0.0, 0.2, 0.5, 0.7], [0.0, 0.0, 0.6, 0.4]])
    text, image = torch.eye(4), sims.t()  # text @ image.T == sims: rows 2 and 3 rank the match 2nd
    recall = retrieval_recall(text, image, ks=(1, 2))
    assert recall["t2i_R@1"] == 0.5 and recall["t2i_R@2"] == 1.0 and recall["i2t_R@1"] == 0.5


def test_learning_rate_schedules():
    warm = Optim(warmup_steps=10)
    assert lr_factor(0, warm, 100) == 0.0 and lr_factor(5, warm, 100) == 0.5 and lr_factor(50, warm, 100) == 1
    step = Optim(warmup_steps=0, schedule="step", decay_steps=(10, 20), decay_factor=0.1)
    assert [lr_factor(s, step, 100) for s in (9, 10, 25)] == [1.0, 0.1, 0.1**2]
    linear = Optim(warmup_steps=10, schedule="linear")
    assert lr_factor(10, linear, 110) == 1.0 and lr_factor(60, linear, 110) == 0.5
