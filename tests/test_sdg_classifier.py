"""The noisy classifier of SDG's control experiment: its guidance energy is log p(y | x_t, t) and it learns."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from common.guidance import energy_guidance
from common.schedule import NoiseSchedule
from sdg.classifier import NoisyClassifier, log_probability_energy, noisy_classification_loss


SCHED = NoiseSchedule.named("linear")


def test_guidance_is_the_gradient_of_the_log_probability_per_sample():
    torch.manual_seed(0)
    model = NoisyClassifier(channels=8, num_classes=3).double()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    t = torch.tensor([0, 100, 500, 900])
    labels = torch.tensor([0, 2, 1, 2])
    grad = energy_guidance([(2.5, log_probability_energy(model, labels))])(x, t)
    for i in range(4):  # sample i's gradient from its own log p alone: nothing leaks between samples
        xi = x[i:i + 1].clone().requires_grad_(True)
        logp = F.log_softmax(model(xi, t[i:i + 1]), dim=-1)[0, labels[i]]
        (expected,) = torch.autograd.grad(2.5 * logp, xi)
        assert torch.allclose(grad[i:i + 1], expected, atol=1e-12)


def test_the_classifier_learns_a_separable_task_through_noise():
    """Two classes told apart by the sign of the mean: after training it beats chance clearly at low noise."""
    torch.manual_seed(0)
    model = NoisyClassifier(channels=8, num_classes=2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)

    def batch(n):
        y = torch.randint(0, 2, (n,), generator=gen)
        return (y.float() * 2 - 1).view(-1, 1, 1, 1).expand(n, 3, 16, 16) * 0.8, y

    losses = []
    for _ in range(60):
        x0, y = batch(32)
        loss = noisy_classification_loss(model, x0, y, SCHED, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10
    x0, y = batch(128)
    with torch.no_grad():
        accuracy = (model(x0, torch.full((128,), 50)).argmax(-1) == y).float().mean()
    assert accuracy > 0.9
