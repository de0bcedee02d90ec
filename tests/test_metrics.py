"""Tests for common.metrics and common.eval_cli: maths against float64 references, loaders on tiny saved models."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import scipy.linalg
import torch
import torchvision
from PIL import Image

from common.errors import UserError, cli_entry
from common.eval_cli import register_metric_subcommands
from common.metrics import (
    clip_frechet_distance,
    clip_image_similarity,
    clip_scores,
    feature_statistics,
    fid_between,
    fid_from_features,
    frame_consistency,
    frechet_distance,
    image_features,
    inception_features,
    kid_from_features,
    load_features,
    load_fid_inception,
    load_mask,
    load_statistics,
    mask_agreement,
    mmd2_unbiased,
    parse_stroke_mask,
    parsed_mask_agreement,
    polynomial_kernel,
    polynomial_mmd2,
    save_statistics,
)


# ------------------------------------------------------------------------------------------------ helpers


def random_spd(rng: np.random.Generator, dim: int, rank: int | None = None) -> np.ndarray:
    factor = rng.standard_normal((dim, rank or dim))
    return factor @ factor.T / (rank or dim)


def scipy_frechet(mu1, s1, mu2, s2) -> float:
    """The classic pytorch-fid formula: scipy.linalg.sqrtm of the (non-symmetric) product S1 S2."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def digit_like_images(count: int, seed: int, size: int = 32) -> list[Image.Image]:
    """Coloured random strokes on black, like the digits world."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        canvas = np.zeros((size, size, 3), dtype=np.uint8)
        rows, cols = rng.integers(4, size - 4, size=2)
        canvas[rows - 3 : rows + 3, 4 : size - 4] = rng.integers(60, 256, size=3)
        canvas[4 : size - 4, cols - 2 : cols + 2] = rng.integers(60, 256, size=3)
        images.append(Image.fromarray(canvas))
    return images


def save_images(folder, images, prefix: str = "img"):
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(folder / f"{prefix}{i:03d}.png")
    return folder


def run_cli(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="evaluate")
    register_metric_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


class NotATensor:
    """Pickled by reference: a weights_only load must refuse it."""


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A full-size FID-Inception state dict with random weights (torchvision's Inception3 has the same keys).

    Convs are scaled by sqrt(6) over PyTorch's default init so pool3 features are O(0.1), not 1e-8.
    """
    torch.manual_seed(0)
    net = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, init_weights=False, weights=None)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.mul_(math.sqrt(6))
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def clip_setup(tmp_path_factory):
    """Two tiny open_clip models (a ViT and a ModifiedResNet, like ViT-B/* and RN101) from config JSONs."""
    import open_clip

    folder = tmp_path_factory.mktemp("clip")
    text_cfg = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
    configs = {
        "tiny-test-vit": {
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16}
        },
        "tiny-test-rn": {"vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8}},
    }
    models, files = {}, {}
    for seed, (name, cfg) in enumerate(configs.items()):
        config_path = folder / f"{name}.json"
        config_path.write_text(json.dumps({"embed_dim": 16, **cfg, "text_cfg": text_cfg}))
        open_clip.add_model_config(config_path)
        torch.manual_seed(seed)
        model, _, preprocess = open_clip.create_model_and_transforms(name)
        weights = folder / f"{name}.pt"
        torch.save(model.state_dict(), weights)
        models[name] = (model.eval(), preprocess, open_clip.get_tokenizer(name))
        files[name] = (config_path, weights)
    return models, files


# ------------------------------------------------------------------------------------------------ Fréchet distance


def test_frechet_distance_matches_scipy_sqrtm_reference():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    s1, s2 = random_spd(rng, 8), random_spd(rng, 8)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(scipy_frechet(mu1, s1, mu2, s2), rel=1e-9)


def test_frechet_distance_rank_deficient_matches_torch_fidelity():
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((6, 20)), rng.standard_normal((9, 20)) * 1.5 + 0.3  # N < D: singular covariances
    (mu1, s1), (mu2, s2) = feature_statistics(x), feature_statistics(y)
    reference = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, verbose=False)
    assert fid_from_features(x, y) == pytest.approx(reference["frechet_inception_distance"], rel=1e-7)
    # singular S1 and S2: the covariance route falls back from Cholesky to the eigh square root
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference["frechet_inception_distance"], rel=1e-7)


def test_fid_sample_space_route_equals_covariance_route_when_n_below_d():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((5, 40)) @ rng.standard_normal((40, 40))
    y = rng.standard_normal((9, 40)) @ rng.standard_normal((40, 40)) + 0.7
    assert fid_from_features(x, y) == pytest.approx(
        scipy_frechet(*feature_statistics(x), *feature_statistics(y)), rel=1e-6
    )
    assert fid_between(x, feature_statistics(y)) == pytest.approx(fid_from_features(x, y), rel=1e-6)
    wide = rng.standard_normal((4, 2048))  # Inception width, 4 images: exact zero for a set against itself
    assert fid_from_features(wide, wide) == pytest.approx(0.0, abs=1e-10 * (wide.var(axis=0).sum()))


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(2)
    a, b = rng.uniform(0.1, 3.0, 12), rng.uniform(0.1, 3.0, 12)
    mu1, mu2 = rng.standard_normal(12), rng.standard_normal(12)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_fid_of_set_with_itself_is_zero_and_a_mean_shift_adds_its_squared_norm():
    rng = np.random.default_rng(3)
    features = rng.standard_normal((400, 16)) @ rng.standard_normal((16, 16))
    assert fid_from_features(features, features) == pytest.approx(0.0, abs=1e-8)
    shifts = [0.5, 1.0, 2.0]
    values = [fid_from_features(features, features + s) for s in shifts]  # shift every coordinate by s
    assert values == pytest.approx([16 * s**2 for s in shifts], rel=1e-8)


def test_feature_statistics_match_numpy_and_need_two_rows():
    rng = np.random.default_rng(4)
    features = rng.standard_normal((50, 5))
    mu, sigma = feature_statistics(torch.from_numpy(features).float())
    assert np.allclose(mu, features.mean(0), atol=1e-6)
    assert np.allclose(sigma, np.cov(features.T), atol=1e-5)
    with pytest.raises(UserError, match="at least 2"):
        feature_statistics(features[:1])


def test_frechet_distance_rejects_mismatched_dimensions():
    with pytest.raises(UserError, match="dimensions differ"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ------------------------------------------------------------------------------------------------ KID


def test_mmd2_unbiased_matches_explicit_double_sum():
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((5, 3)), rng.standard_normal((7, 3)) + 0.5

    def k(a, b):
        return (a @ b / 3 + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    yy = sum(k(y[i], y[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    xy = sum(k(x[i], y[j]) for i in range(5) for j in range(7)) / (5 * 7)
    assert polynomial_mmd2(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)


def test_kid_matches_torch_fidelity_subset_for_subset():
    from torch_fidelity.metric_kid import kid_features_to_metric

    rng = np.random.default_rng(6)
    x, y = rng.standard_normal((60, 8)), rng.standard_normal((50, 8)) + 0.2
    ours = kid_from_features(x, y, num_subsets=7, subset_size=30, seed=11)
    theirs = kid_features_to_metric(
        torch.from_numpy(x), torch.from_numpy(y), kid_subsets=7, kid_subset_size=30, rng_seed=11, verbose=False
    )
    assert ours["kid_mean"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-10)
    assert ours["kid_std"] == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-10)


def test_kid_estimator_is_unbiased_where_the_biased_one_is_not():
    rng = np.random.default_rng(7)
    unbiased, biased = [], []
    for _ in range(3000):
        x, y = rng.standard_normal((8, 4)), rng.standard_normal((8, 4))
        k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
        unbiased.append(mmd2_unbiased(k_xx, k_yy, k_xy))
        biased.append(k_xx.mean() + k_yy.mean() - 2 * k_xy.mean())
    unbiased, biased = np.array(unbiased), np.array(biased)
    stderr = unbiased.std() / math.sqrt(len(unbiased))
    assert abs(unbiased.mean()) < 4 * stderr
    assert biased.mean() > 10 * biased.std() / math.sqrt(len(biased))  # the V-statistic is visibly > 0


def test_kid_positive_for_different_distributions_and_subset_size_is_clipped():
    rng = np.random.default_rng(8)
    same = kid_from_features(
        rng.standard_normal((80, 6)), rng.standard_normal((80, 6)), num_subsets=20, subset_size=500
    )
    shifted = kid_from_features(rng.standard_normal((80, 6)), rng.standard_normal((80, 6)) + 1.0, num_subsets=20)
    assert same["subset_size"] == 80
    assert shifted["kid_mean"] > 0.1 and shifted["kid_mean"] > 10 * abs(same["kid_mean"])
    with pytest.raises(UserError, match="at least 2"):
        kid_from_features(np.ones((1, 6)), np.ones((5, 6)))


# ------------------------------------------------------------------------------------------------ statistics files


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_statistics_file_roundtrip(tmp_path, suffix):
    rng = np.random.default_rng(9)
    features = rng.standard_normal((10, 4))
    mu, sigma = feature_statistics(features)
    path = save_statistics(tmp_path / f"ref{suffix}", mu, sigma, features=features)
    loaded_mu, loaded_sigma = load_statistics(path)
    assert np.array_equal(loaded_mu, mu) and np.array_equal(loaded_sigma, sigma)
    assert np.array_equal(load_features(path), features)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"ref{suffix}"]  # no temporary file left behind


def test_statistics_file_errors(tmp_path):
    np.savez(tmp_path / "bad.npz", mean=np.zeros(3))
    with pytest.raises(UserError, match="needs 'mu' and 'sigma'"):
        load_statistics(tmp_path / "bad.npz")
    save_statistics(tmp_path / "stats.npz", np.zeros(3), np.eye(3))
    with pytest.raises(UserError, match="KID needs per-image features"):
        load_features(tmp_path / "stats.npz")
    with pytest.raises(UserError, match="does not exist"):
        load_statistics(tmp_path / "missing.npz")


# ------------------------------------------------------------------------------------------------ Inception


def test_fid_inception_loads_local_weights_safely(inception_weights, tmp_path):
    saved = torch.load(inception_weights, weights_only=True)
    network = load_fid_inception(inception_weights)
    loaded = network.state_dict()
    assert set(loaded) == set(saved)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)

    from safetensors.torch import save_file

    save_file(saved, str(tmp_path / "inception.safetensors"))
    from_safetensors = load_fid_inception(tmp_path / "inception.safetensors")
    assert torch.equal(from_safetensors.state_dict()["fc.weight"], saved["fc.weight"])


def test_inception_features_folder_tensor_and_mixed_sizes_agree(inception_weights, tmp_path):
    images = digit_like_images(3, seed=0)
    folder = save_images(tmp_path / "gen", images)
    from_folder = inception_features(folder, inception_weights, batch_size=2)
    assert from_folder.shape == (3, 2048) and from_folder.dtype == np.float64
    assert np.isfinite(from_folder).all() and from_folder.std(axis=0).max() > 1e-4  # images give different features

    network = load_fid_inception(inception_weights)
    tensor = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images]).float() / 255
    assert np.allclose(image_features(tensor, network, batch_size=3), from_folder, rtol=1e-4, atol=1e-6)
    big = images[0].resize((48, 48), Image.NEAREST)  # a mixed-size batch goes image by image
    mixed = image_features([big, images[1]], network, batch_size=2)
    assert np.allclose(mixed[1], from_folder[1], rtol=1e-4, atol=1e-6)


def test_inception_weights_errors(inception_weights, tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_fid_inception(tmp_path / "nope.pth")
    torch.save({"fc.weight": NotATensor()}, tmp_path / "code.pth")
    with pytest.raises(UserError, match="pickled Python objects"):
        load_fid_inception(tmp_path / "code.pth")
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(UserError, match="does not hold the FID Inception weights"):
        load_fid_inception(tmp_path / "wrong.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no images"):
        inception_features(tmp_path / "empty", inception_weights)


def test_fid_cli_folder_vs_itself_vs_saved_stats(inception_weights, tmp_path, capsys):
    gen = save_images(tmp_path / "gen", digit_like_images(3, seed=1))
    ref = save_images(tmp_path / "ref", digit_like_images(3, seed=2))
    common = ["--inception-weights", str(inception_weights)]
    report = run_cli(
        [
            "fid",
            str(gen),
            str(ref),
            *common,
            "--out",
            str(tmp_path / "fid.json"),
            "--save-reference-stats",
            str(tmp_path / "ref.npz"),
        ]
    )
    assert report["fid"] > 0
    assert json.loads((tmp_path / "fid.json").read_text())["fid"] == report["fid"]
    assert "FID" in capsys.readouterr().out
    again = run_cli(["fid", str(gen), str(tmp_path / "ref.npz"), *common, "--out", str(tmp_path / "fid2.json")])
    assert again["fid"] == pytest.approx(report["fid"], rel=1e-9)
    self_fid = run_cli(
        ["fid", str(tmp_path / "ref.npz"), str(tmp_path / "ref.npz"), *common, "--out", str(tmp_path / "fid3.json")]
    )
    assert self_fid["fid"] == pytest.approx(0.0, abs=1e-9 * max(1.0, report["fid"]))


def test_fid_cli_needs_two_images_and_kid_cli_from_feature_files(inception_weights, tmp_path):
    one = save_images(tmp_path / "one", digit_like_images(1, seed=3))
    with pytest.raises(UserError, match="at least 2 images"):
        run_cli(["fid", str(one), str(one), "--inception-weights", str(inception_weights)])
    rng = np.random.default_rng(10)
    for name, shift in (("a", 0.0), ("b", 1.0)):
        features = rng.standard_normal((40, 8)) + shift
        save_statistics(tmp_path / f"{name}.safetensors", *feature_statistics(features), features=features)
    report = run_cli(
        [
            "kid",
            str(tmp_path / "a.safetensors"),
            str(tmp_path / "b.safetensors"),
            "--inception-weights",
            str(tmp_path / "unused.pth"),
            "--subsets",
            "5",
            "--subset-size",
            "20",
            "--out",
            str(tmp_path / "kid.json"),
        ]
    )
    assert report["kid_mean"] > 0 and report["subset_size"] == 20


def test_cli_errors_exit_2_with_one_line(tmp_path, capsys):
    @cli_entry
    def main(argv):
        return run_cli(argv)

    with pytest.raises(SystemExit) as exit_info:
        main(["fid", str(tmp_path), str(tmp_path), "--inception-weights", str(tmp_path / "w.pth")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "holds no images" in err


# ------------------------------------------------------------------------------------------------ CLIP


def test_clip_similarity_of_identical_images_is_one_per_model(clip_setup):
    models, _ = clip_setup
    images = digit_like_images(4, seed=4)
    result = clip_image_similarity(images, images, models)
    assert set(result["per_model"]) == set(models)
    assert all(v == pytest.approx(1.0, abs=1e-6) for v in result["per_model"].values())
    other = clip_image_similarity(images, images[::-1], models)
    assert other["mean"] < 1 - 1e-4


def test_clip_scores_are_per_model_then_averaged(clip_setup):
    models, _ = clip_setup
    images = digit_like_images(3, seed=5)
    texts = ["a red handwritten seven", "a blue handwritten one", "a green handwritten two"]
    result = clip_scores(images, texts, models)
    manual, concatenated_img, concatenated_txt = {}, [], []
    with torch.no_grad():
        for name, (model, preprocess, tokenizer) in models.items():
            img = model.encode_image(torch.stack([preprocess(im) for im in images])).double()
            txt = model.encode_text(tokenizer(texts)).double()
            concatenated_img.append(img)
            concatenated_txt.append(txt)
            img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
            manual[name] = (img * txt).sum(-1).mean().item()
    assert result["per_model"] == pytest.approx(manual, abs=1e-6)
    assert result["mean"] == pytest.approx(np.mean(list(manual.values())), abs=1e-6)
    cat_cos = torch.nn.functional.cosine_similarity(torch.cat(concatenated_img, 1), torch.cat(concatenated_txt, 1))
    # Concatenating raw embeddings would weight each model by its embedding norms; the protocol averages instead.
    assert abs(result["mean"] - cat_cos.mean().item()) > 1e-4
    with pytest.raises(UserError, match="paired one to one"):
        clip_scores(images, texts[:2], models)


def test_clip_frechet_distance_zero_for_same_set_positive_otherwise(clip_setup):
    models, _ = clip_setup
    a, b = digit_like_images(6, seed=6), digit_like_images(6, seed=7)
    same = clip_frechet_distance(a, a, models)["per_model"]
    different = clip_frechet_distance(a, b, models)["per_model"]
    # Random tiny CLIPs have small embedding spreads (the RN's ~1e-4), so compare on each model's own scale.
    assert all(different[name] > 0 and same[name] <= 1e-6 * different[name] for name in models)
    with pytest.raises(UserError, match="at least 2"):
        clip_frechet_distance(a[:1], b, models)


def test_clip_score_cli_loads_config_json_and_local_weights(clip_setup, tmp_path):
    models, files = clip_setup
    images = digit_like_images(3, seed=8)
    folder = save_images(tmp_path / "gen", images)
    refs = save_images(tmp_path / "ref", digit_like_images(3, seed=9))
    captions = ["a red seven", "a blue one", "a green two"]
    with open(folder / "metadata.jsonl", "w") as handle:
        for i, caption in enumerate(captions):
            handle.write(json.dumps({"file_name": f"img{i:03d}.png", "text": caption}) + "\n")
    specs = [f"--clip={config}={weights}" for config, weights in files.values()]
    report = run_cli(
        [
            "clip-score",
            "--images",
            str(folder),
            "--references",
            str(refs),
            *specs,
            "--out",
            str(tmp_path / "clip.json"),
        ]
    )
    expected = clip_scores(images, captions, models)
    assert report["image_text"]["per_model"] == pytest.approx(expected["per_model"], abs=1e-6)
    on_disk = json.loads((tmp_path / "clip.json").read_text())
    assert on_disk["image_image"]["mean"] == pytest.approx(report["image_image"]["mean"])
    config, _ = files["tiny-test-vit"]
    with pytest.raises(UserError, match="weights file .* not found"):
        run_cli(["clip-fd", str(folder), str(refs), f"--clip={config}={tmp_path / 'missing.pt'}"])
    with pytest.raises(UserError, match="MODEL_NAME=WEIGHTS_PATH"):
        run_cli(["clip-fd", str(folder), str(refs), "--clip", "ViT-B-32"])


# ------------------------------------------------------------------------------------------------ masks


def test_mask_agreement_known_values_and_absent_classes():
    target = np.array([[0, 0], [1, 1]])
    pred = np.array([[0, 1], [1, 1]])
    result = mask_agreement(pred, target, num_classes=3)
    assert result["pixel_accuracy"] == pytest.approx(3 / 4)
    assert result["per_class_iou"] == pytest.approx([1 / 2, 2 / 3, None])  # class 2 absent: left out
    assert result["mean_iou"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    hallucinated = mask_agreement(np.array([[0, 2], [1, 1]]), target, num_classes=3)
    assert hallucinated["per_class_iou"][2] == 0.0  # predicted but absent from target: counts as 0
    assert hallucinated["mean_iou"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    ignored = mask_agreement(pred, np.array([[0, 255], [1, 1]]), num_classes=2, ignore_index=255)
    assert ignored["pixel_accuracy"] == 1.0 and ignored["num_pixels"] == 3


def test_mask_agreement_accumulates_over_differently_sized_pairs():
    preds = [np.zeros((2, 2), int), np.ones((1, 4), int)]
    targets = [np.array([[0, 1], [0, 0]]), np.ones((1, 4), int)]
    result = mask_agreement(preds, targets, num_classes=2)
    assert result["pixel_accuracy"] == pytest.approx(7 / 8)
    assert result["per_class_iou"] == pytest.approx([3 / 4, 4 / 5])  # from one pooled confusion matrix


def test_mask_agreement_errors():
    with pytest.raises(UserError, match="shape"):
        mask_agreement(np.zeros((4, 4), int), np.zeros((4, 5), int), num_classes=2)
    with pytest.raises(UserError, match="outside"):
        mask_agreement(np.zeros((2, 2), int), np.full((2, 2), 3), num_classes=2)


def test_stroke_parser_reads_dark_coloured_strokes_and_cli(tmp_path):
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[8:24, 14:18] = 1
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    image[mask == 1] = (0, 0, 150)  # dark blue: luminance ~17/255, channel max 150/255
    assert np.array_equal(parse_stroke_mask(Image.fromarray(image)), mask)
    save_images(tmp_path / "gen", [Image.fromarray(image)])
    (tmp_path / "masks").mkdir()
    Image.fromarray(mask * 255).save(tmp_path / "masks" / "img000.png")  # a 0/255 binary PNG
    assert np.array_equal(load_mask(tmp_path / "masks" / "img000.png", num_classes=2), mask)
    report = run_cli(
        [
            "mask",
            "--images",
            str(tmp_path / "gen"),
            "--masks",
            str(tmp_path / "masks"),
            "--out",
            str(tmp_path / "mask.json"),
        ]
    )
    assert report["pixel_accuracy"] == 1.0 and report["mean_iou"] == 1.0
    with pytest.raises(UserError, match="shape"):
        parsed_mask_agreement([Image.fromarray(image)], [np.zeros((16, 16), int)], num_classes=2)


# ------------------------------------------------------------------------------------------------ frames


def test_pixel_frame_consistency_consecutive_vs_all_pairs():
    a = torch.zeros(3, 8, 8)
    b = torch.full((3, 8, 8), 0.25)
    clip = torch.stack([a, b, a])
    consecutive = frame_consistency(clip)
    assert consecutive["method"] == "pixel" and consecutive["num_pairs"] == 2
    assert consecutive["mean"] == pytest.approx(1 - 0.25, abs=1e-3)  # uint8 quantisation: 64/255
    everything = frame_consistency(clip, pairs="all")
    assert everything["num_pairs"] == 3 and everything["mean"] == pytest.approx(1 - 2 * (64 / 255) / 3)
    assert frame_consistency(torch.stack([a, a, a]))["mean"] == 1.0
    with pytest.raises(UserError, match="at least 2 frames"):
        frame_consistency(clip[:1])


def test_clip_frame_consistency_identical_frames_and_cli(clip_setup, tmp_path):
    models, files = clip_setup
    frame = digit_like_images(1, seed=10)[0]
    still = frame_consistency([frame] * 4, models)
    assert still["method"] == "clip" and all(v == pytest.approx(1.0, abs=1e-6) for v in still["per_model"].values())
    moving = frame_consistency(digit_like_images(4, seed=11), models)
    assert moving["mean"] < 1 - 1e-4
    save_images(tmp_path / "clips" / "still", [frame] * 3)
    save_images(tmp_path / "clips" / "moving", digit_like_images(3, seed=12))
    config, weights = files["tiny-test-rn"]
    report = run_cli(
        ["frames", str(tmp_path / "clips"), f"--clip={config}={weights}", "--out", str(tmp_path / "f.json")]
    )
    assert report["clips"]["still"]["mean"] == pytest.approx(1.0, abs=1e-6)
    assert report["clips"]["moving"]["mean"] < report["clips"]["still"]["mean"]
    pixel = run_cli(["frames", str(tmp_path / "clips" / "still"), "--out", str(tmp_path / "p.json")])
    assert pixel["method"] == "pixel" and pixel["mean"] == 1.0
