import torch

from common.guidance import energy_guidance


def test_guidance_gradient_matches_finite_differences():
    w = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def cosine_energy(x, t):  # per-sample cosine to a target, like SDG's language score
        return torch.nn.functional.cosine_similarity(x.flatten(1), w.flatten(1), dim=1)

    def quad_energy(x, t):
        return -(x**2).flatten(1).sum(1) * (1 + t.to(x.dtype))

    guide = energy_guidance([(2.0, cosine_energy), (0.5, quad_energy)])
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = torch.tensor([3, 7])
    grad = guide(x, t)

    def total(x):
        return (2.0 * cosine_energy(x, t) + 0.5 * quad_energy(x, t)).sum()

    eps = 1e-6
    for idx in [(0, 0, 0, 0), (1, 2, 3, 1), (0, 1, 2, 3)]:
        e = torch.zeros_like(x)
        e[idx] = eps
        fd = (total(x + e) - total(x - e)) / (2 * eps)
        assert abs(float(fd) - float(grad[idx])) < 1e-6


def test_zero_weights_give_zero_gradient_without_calling_energies():
    called = []
    guide = energy_guidance([(0.0, lambda x, t: called.append(1) or x.sum())])
    x = torch.randn(1, 2)
    assert torch.equal(guide(x, torch.zeros(1)), torch.zeros_like(x))
    assert not called


def test_per_sample_energies_give_per_sample_gradients():
    guide = energy_guidance([(1.0, lambda x, t: (x**3).flatten(1).sum(1))])
    x = torch.randn(3, 5)
    g_batch = guide(x, torch.zeros(3))
    g_one = guide(x[1:2], torch.zeros(1))
    assert torch.allclose(g_batch[1:2], g_one)
