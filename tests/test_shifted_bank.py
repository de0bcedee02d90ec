"""The Gaussian bank: selection, buffers, files, fitting, bad input."""

import pytest
import torch

from common.errors import UserError
from shifted.bank import GaussianBank, block_unit, fit_bank


NAMES = ("clip-a", "clip-b", "clip-c")
BLOCKS = (4, 4, 2)


def planted_bank(**kwargs):
    mean = torch.tensor([
        [1.0, 0, 0, 0, 1, 0, 0, 0, 1, 0],
        [0, 1.0, 0, 0, 0, 1, 0, 0, 0, 1],
        [0, 0, 1.0, 0, 0, 0, 1, 0, 1, 1],
    ]) * torch.tensor([3.0, 5.0, 0.5]).unsqueeze(1)  # very different norms: selection must be by angle only
    std = torch.rand(3, 10, generator=torch.Generator().manual_seed(0)) + 0.1
    return GaussianBank(mean, std, 5.0, clip_models=NAMES, block_dims=BLOCKS, **kwargs)


def test_selection_picks_the_planted_nearest_mean_and_ignores_scale():
    bank = planted_bank()
    g = torch.Generator().manual_seed(1)
    true = torch.tensor([0, 1, 2, 2, 0, 1])
    c = bank.mean[true] / bank.mean[true].norm(dim=1, keepdim=True) + 0.05 * torch.randn(6, 10, generator=g)
    assert torch.equal(bank.select(c), true)
    assert torch.equal(bank.select(37.0 * c), true)  # cosine: positive rescaling changes nothing
    assert torch.equal(bank.select(1e-3 * c), true)
    mu, S = bank.gather(true)
    assert torch.equal(mu, bank.mean[true]) and torch.allclose(S, 5.0 * bank.std[true])
    sampled = bank.select(c, mode="sample", num_samples=4, generator=torch.Generator().manual_seed(2))
    assert sampled.shape == (6,) and sampled.dtype == torch.long


def test_per_block_similarity_is_the_mean_of_per_model_cosines_and_can_choose_differently():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(5, 10, generator=g), torch.randn(5, 10, generator=g)
    ua, ub = block_unit(a, BLOCKS, "per_block"), block_unit(b, BLOCKS, "per_block")
    per_model = torch.stack([torch.cosine_similarity(x, y, dim=1) for x, y in
                             zip(a.split(BLOCKS, 1), b.split(BLOCKS, 1))], 1).mean(1)
    assert torch.allclose((ua * ub).sum(1), per_model, atol=1e-6)
    # mean 0 dominates the concatenation through its big first block; per block, mean 1 agrees on two blocks of 3
    mean = torch.tensor([[10.0, 0, 0, 0, 0, 0, 0, 0, 0, 0], [1.0, 0, 0, 0, 0, 1, 0, 0, 0, 1]])
    c = torch.tensor([[1.0, 0, 0, 0, 0, 1, 0, 0, 0, 1]]) + torch.tensor([[5.0] + [0] * 9])
    concat = GaussianBank(mean, torch.ones_like(mean), block_dims=BLOCKS)
    per_block = GaussianBank(mean, torch.ones_like(mean), block_dims=BLOCKS, similarity="per_block")
    assert int(concat.select(c)) == 0 and int(per_block.select(c)) == 1


def test_buffers_survive_state_dict_and_file_round_trips(tmp_path):
    """Pitfall 1: the released Vocab kept mu / sigma as attributes, so a reloaded model sampled with sigma = 0."""
    bank = planted_bank(similarity="per_block")
    state = bank.state_dict()
    assert set(state) == {"mean", "std", "std_scale"}
    fresh = GaussianBank.empty(3, 10, block_dims=BLOCKS)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.std, bank.std) and float(fresh.std_scale) == 5.0
    path = bank.save(tmp_path / "bank.safetensors")
    loaded = GaussianBank.load(path, clip_models=NAMES)
    assert torch.equal(loaded.mean, bank.mean) and torch.equal(loaded.std, bank.std)
    assert loaded.clip_models == NAMES and loaded.block_dims == BLOCKS and loaded.similarity == "per_block"
    assert float(loaded.std_scale) == 5.0
    with pytest.raises(UserError, match="CLIP models") as err:
        GaussianBank.load(path, clip_models=("clip-a", "clip-c", "clip-b"))  # same models, other order
    assert "\n" not in str(err.value)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="corrupt"):
        GaussianBank.load(tmp_path / "junk.safetensors")


def three_clusters(n_per=400, seed=4):
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[4.0, 0, 0, 1, 0, 0], [0, 3.0, 0, 0, 1, 0], [0, 0, 6.0, 0, 0, 1]])
    stds = torch.tensor([
        [0.2, 0.1, 0.3, 0.05, 0.1, 0.1], [0.1, 0.3, 0.1, 0.1, 0.05, 0.2], [0.3, 0.2, 0.2, 0.1, 0.1, 0.05],
    ])
    x = torch.cat([centers[k] + stds[k] * torch.randn(n_per, 6, generator=g) for k in range(3)])
    return x, centers, stds


@pytest.mark.parametrize("method", ["spherical_kmeans", "gmm_diag"])
def test_fit_bank_recovers_planted_means_and_stds(method):
    x, centers, stds = three_clusters()
    bank = fit_bank(x, 3, method, std_scale=5.0, seed=0, clip_models=("m1", "m2"), block_dims=(3, 3))
    order = bank.select(centers)  # the fitted component of each planted cluster
    assert sorted(order.tolist()) == [0, 1, 2]
    assert torch.allclose(bank.mean[order], centers, atol=0.05)
    assert torch.allclose(bank.std[order], stds, rtol=0.15, atol=0.01)
    assert float(bank.std_scale) == 5.0 and bank.clip_models == ("m1", "m2")
    # every training point is assigned (by the bank's own cosine rule) to the component of its cluster
    assert torch.equal(bank.select(x), order.repeat_interleave(400))


def test_fit_bank_k1_is_one_global_gaussian_with_floored_std():
    x, _, _ = three_clusters(n_per=50)
    x[:, 5] = 1.0  # a constant dimension: its std is floored, not zero
    bank = fit_bank(x, 1, std_floor=1e-3, std_scale=2.0)
    assert bank.size == 1
    assert torch.allclose(bank.mean[0], x.mean(0), atol=1e-6)
    assert torch.allclose(bank.std[0, :5], x[:, :5].std(0, unbiased=False), atol=1e-6)
    assert float(bank.std[0, 5]) == pytest.approx(1e-3)
    assert torch.allclose(bank.gather(torch.zeros(2, dtype=torch.long))[1], 2.0 * bank.std.expand(2, -1))


def test_bad_input_is_one_clear_line():
    bank = planted_bank()
    cases = [
        (lambda: bank.select(torch.randn(2, 12)), "10-dimensional but the conditioning embedding is 12"),
        (lambda: bank.check_embedding_dim(1536, "the CLIP models"), "10-dimensional"),
        (lambda: bank.check_clip_models(("ViT-B-16/openai", "ViT-B-32/openai", "RN101/openai")), "CLIP models"),
        (lambda: bank.gather(torch.tensor([3])), "out of range"),
        (lambda: bank.select(torch.randn(2, 10), mode="nearest"), "unknown bank selection mode"),
        (lambda: fit_bank(torch.randn(5, 3), 8), "cannot fit 8 Gaussians to 5"),
        (lambda: fit_bank(torch.randn(20, 3), 2, "dbscan"), "unknown bank fitting method"),
        (lambda: fit_bank(torch.full((20, 3), float("nan")), 2), "NaN"),
        (lambda: GaussianBank(torch.zeros(2, 3), torch.ones(2, 4)), "one shape"),
        (lambda: GaussianBank(torch.zeros(2, 3), -torch.ones(2, 3)), "non-negative"),
        (lambda: GaussianBank(torch.zeros(2, 3), torch.ones(2, 3), block_dims=(2, 2)), "do not add up"),
    ]
    for call, match in cases:
        with pytest.raises(UserError, match=match) as err:
            call()
        assert "\n" not in str(err.value)
