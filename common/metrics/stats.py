"""Feature statistics, Fréchet distance (FID) and kernel distance (KID), in float64 numpy.

- FID (Heusel et al. 2017, eq. 6): fit a Gaussian to each feature set and take the Fréchet (2-Wasserstein)
  distance ``d^2 = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})``.
- KID (Bińkowski et al. 2018, "Demystifying MMD GANs", §4): the unbiased estimator of the squared MMD with
  the cubic polynomial kernel ``k(x, y) = (x.y / d + 1)^3``, averaged over random subsets.

These work on any features (Inception pool3, CLIP embeddings, ...). Statistics files hold ``mu`` ``[D]`` and
``sigma`` ``[D, D]`` (the keys pytorch-fid's ``--save-stats`` writes), optionally ``features`` ``[N, D]`` too,
as ``.npz`` or ``.safetensors``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from common.errors import UserError
from common.io import atomic_write_file


STATS_SUFFIXES = (".npz", ".safetensors")


def as_features(features, name: str = "features") -> np.ndarray:
    """Any ``[N, D]`` array or tensor -> float64 numpy ``[N, D]``; UserError for other shapes or NaN/inf."""
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().double().numpy()
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] == 0:
        raise UserError(f"{name} must be a non-empty [N, D] array, got shape {list(array.shape)}")
    if not np.isfinite(array).all():
        raise UserError(f"{name} contain NaN or inf; check the images and the feature network's weights")
    return array


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` (ddof=1, as pytorch-fid / torch-fidelity) of ``[N, D]``.

    Needs N >= 2. With N <= D the covariance is rank-deficient; FID is still defined but biased upwards
    (Chong & Forsyth 2020), so compare FIDs only at equal N.
    """
    array = as_features(features)
    if array.shape[0] < 2:
        raise UserError(f"need at least 2 images to estimate feature statistics, got {array.shape[0]}; add images")
    return array.mean(axis=0), np.cov(array, rowvar=False, ddof=1).reshape(array.shape[1], array.shape[1])


def _symmetric(matrix: np.ndarray) -> np.ndarray:
    return (matrix + matrix.T) / 2


def psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD ``[D, D]`` matrix via ``eigh`` (tiny negative eigenvalues -> 0)."""
    eigenvalues, eigenvectors = np.linalg.eigh(_symmetric(matrix))
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def _sum_sqrt_eigenvalues(symmetric_psd: np.ndarray) -> float:
    eigenvalues = np.linalg.eigvalsh(_symmetric(symmetric_psd))
    return float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``Tr((S1 S2)^{1/2})`` for PSD ``[D, D]`` S1, S2, via a symmetric matrix with the same eigenvalues as S1 S2.

    If S1 (or S2) is positive definite, ``S1 = L L^T`` (Cholesky) and ``L^T S2 L`` is similar to ``S1 S2``; else
    ``S1^{1/2} S2 S1^{1/2}`` (eigh square root) is. Either is symmetric PSD, so only ``eigvalsh`` is needed: no
    complex ``sqrtm`` and no "imaginary component" failures on rank-deficient inputs.
    """
    for first, second in ((sigma1, sigma2), (sigma2, sigma1)):  # Tr sqrt(S1 S2) = Tr sqrt(S2 S1)
        try:
            chol = np.linalg.cholesky(_symmetric(first))
        except np.linalg.LinAlgError:
            continue
        return _sum_sqrt_eigenvalues(chol.T @ second @ chol)
    root1 = psd_sqrt(sigma1)
    return _sum_sqrt_eigenvalues(root1 @ sigma2 @ root1)


def _check_gaussian(mu: np.ndarray, sigma: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.asarray(mu, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise UserError(f"{name}: mu must be [D] and sigma [D, D], got {list(mu.shape)} and {list(sigma.shape)}")
    return mu, sigma


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, S1) and N(mu2, S2): ``||mu1-mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^{1/2})``.

    Shapes: mu ``[D]``, sigma ``[D, D]``. Heusel et al. 2017, eq. 6; Dowson & Landau 1982.
    """
    mu1, sigma1 = _check_gaussian(mu1, sigma1, "first statistics")
    mu2, sigma2 = _check_gaussian(mu2, sigma2, "second statistics")
    if mu1.shape != mu2.shape:
        raise UserError(
            f"feature dimensions differ ({mu1.shape[0]} vs {mu2.shape[0]}); compute both with the same network/layer"
        )
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2)
    return float(max(value, 0.0))


def fid_from_features(features1, features2) -> float:
    """FID between two feature sets ``[N1, D]`` and ``[N2, D]`` (N1, N2 >= 2): Gaussian fit, then Fréchet distance.

    When ``min(N1, N2) < D`` (small sets: tests, the digits demo, CLIP spaces) the trace term is computed in sample
    space: with centred, ``1/sqrt(N-1)``-scaled features ``A1 [N1, D]``, ``A2 [N2, D]`` (so ``S = A^T A``), the
    non-zero eigenvalues of ``S1 S2`` are those of ``B B^T`` with ``B = A1 A2^T``, hence
    ``Tr((S1 S2)^{1/2}) = ||A1 A2^T||_*`` (nuclear norm). Same value as the ``[D, D]`` route, without a D^3
    eigendecomposition and without summing ``sqrt`` of round-off around the D - N zero eigenvalues.
    """
    x = as_features(features1, "first features")
    y = as_features(features2, "second features")
    if x.shape[1] != y.shape[1]:
        raise UserError(f"feature dimensions differ ({x.shape[1]} vs {y.shape[1]}); use the same network for both")
    if min(x.shape[0], y.shape[0]) >= x.shape[1]:
        return frechet_distance(*feature_statistics(x), *feature_statistics(y))
    if min(x.shape[0], y.shape[0]) < 2:
        raise UserError(f"need at least 2 images per set for FID, got {x.shape[0]} and {y.shape[0]}; add images")
    a = (x - x.mean(axis=0)) / np.sqrt(x.shape[0] - 1)
    b = (y - y.mean(axis=0)) / np.sqrt(y.shape[0] - 1)
    diff = x.mean(axis=0) - y.mean(axis=0)
    trace_sqrt = np.linalg.svd(a @ b.T, compute_uv=False).sum()
    return float(max(diff @ diff + (a * a).sum() + (b * b).sum() - 2.0 * trace_sqrt, 0.0))


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None, coef0: float = 1.0):
    """``k(x, y) = (gamma x.y + coef0)^degree`` for rows of ``x [N, D]``, ``y [M, D]`` -> ``[N, M]``; gamma = 1/D."""
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (x @ y.T * gamma + coef0) ** degree


def mmd2_unbiased(k_xx: np.ndarray, k_yy: np.ndarray, k_xy: np.ndarray) -> float:
    """Unbiased MMD^2 from kernel matrices ``[m, m]``, ``[n, n]``, ``[m, n]`` (Gretton et al. 2012, eq. 3).

    ``MMD^2_u = sum_{i!=j} k(x_i,x_j) / (m(m-1)) + sum_{i!=j} k(y_i,y_j) / (n(n-1)) - 2 sum_{i,j} k(x_i,y_j) / (mn)``.
    Its expectation is exactly the population MMD^2 (0 when both samples come from one distribution).
    """
    m, n = k_xx.shape[0], k_yy.shape[0]
    if m < 2 or n < 2:
        raise UserError(f"the unbiased MMD needs at least 2 samples per set, got {m} and {n}; add images")
    sum_xx = k_xx.sum() - np.trace(k_xx)
    sum_yy = k_yy.sum() - np.trace(k_yy)
    return float(sum_xx / (m * (m - 1)) + sum_yy / (n * (n - 1)) - 2.0 * k_xy.sum() / (m * n))


def polynomial_mmd2(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None, coef0: float = 1.0):
    """Unbiased MMD^2 between feature sets ``[m, D]`` and ``[n, D]`` with the polynomial kernel."""
    kernel = {"degree": degree, "gamma": gamma, "coef0": coef0}
    return mmd2_unbiased(
        polynomial_kernel(x, x, **kernel), polynomial_kernel(y, y, **kernel), polynomial_kernel(x, y, **kernel)
    )


def kid_from_features(
    features1,
    features2,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
) -> dict:
    """KID: mean and std over ``num_subsets`` of the unbiased polynomial MMD^2 on random subsets.

    ``features1 [N1, D]``, ``features2 [N2, D]``. Each subset draws ``subset_size`` rows without replacement from
    each set (clipped to ``min(N1, N2)``; the value used is returned). Subsets are drawn exactly as torch-fidelity
    draws them (``RandomState(seed)``, first set then second), so the numbers match its ``calculate_kid``.
    Returns ``{"kid_mean", "kid_std", "subset_size", "num_subsets"}`` (raw MMD^2; papers often print x1000).
    """
    x = as_features(features1, "first features")
    y = as_features(features2, "second features")
    if x.shape[1] != y.shape[1]:
        raise UserError(f"feature dimensions differ ({x.shape[1]} vs {y.shape[1]}); use the same network for both")
    if num_subsets < 1:
        raise UserError(f"num_subsets must be >= 1, got {num_subsets}")
    size = min(subset_size, x.shape[0], y.shape[0])
    if size < 2:
        raise UserError(f"KID needs at least 2 images per set, got {x.shape[0]} and {y.shape[0]}; add images")
    rng = np.random.RandomState(seed)
    values = np.empty(num_subsets)
    for i in range(num_subsets):
        sub_x = x[rng.choice(x.shape[0], size, replace=False)]
        sub_y = y[rng.choice(y.shape[0], size, replace=False)]
        values[i] = polynomial_mmd2(sub_x, sub_y, degree=degree, gamma=gamma, coef0=coef0)
    return {
        "kid_mean": float(values.mean()),
        "kid_std": float(values.std()),
        "subset_size": size,
        "num_subsets": num_subsets,
    }


def is_statistics_file(path: str | Path) -> bool:
    """True when ``path`` names a statistics/features file (by suffix) rather than an image folder."""
    return Path(path).suffix.lower() in STATS_SUFFIXES


def save_statistics(path: str | Path, mu, sigma, features=None) -> Path:
    """Write ``mu [D]``, ``sigma [D, D]`` (and optionally ``features [N, D]``) to ``.npz`` or ``.safetensors``.

    Written through :func:`common.io.atomic_write_file`, so it is never left half-written.
    """
    path = Path(path)
    arrays = {"mu": np.asarray(mu, dtype=np.float64), "sigma": np.asarray(sigma, dtype=np.float64)}
    if features is not None:
        arrays["features"] = as_features(features)
    suffix = path.suffix.lower()
    if suffix not in STATS_SUFFIXES:
        raise UserError(f"statistics file {path} must end in .npz or .safetensors")
    with atomic_write_file(path) as tmp:
        if suffix == ".npz":
            np.savez(tmp, **arrays)
        else:
            from safetensors.numpy import save_file

            save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp))
    return path


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise UserError(f"statistics file {path} does not exist; compute it with the fid subcommand's --save-stats")
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as data:
                return {key: data[key] for key in data.files}
        from safetensors.numpy import load_file

        return load_file(str(path))
    except Exception as err:  # corrupt zip / header: the user's file, not our bug
        raise UserError(f"cannot read statistics file {path} ({type(err).__name__}: {err}); recompute it") from None


def load_statistics(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(mu [D], sigma [D, D])`` from a ``.npz``/``.safetensors`` file with ``mu``/``sigma`` or ``features``."""
    path = Path(path)
    arrays = _read_arrays(path)
    if "mu" in arrays and "sigma" in arrays:
        return _check_gaussian(arrays["mu"], arrays["sigma"], str(path))
    if "features" in arrays:
        return feature_statistics(arrays["features"])
    raise UserError(f"statistics file {path} has keys {sorted(arrays)}; it needs 'mu' and 'sigma' (or 'features')")


def load_reference(path: str | Path) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """A statistics file's ``features [N, D]`` when it holds them (exact, and KID-capable), else ``(mu, sigma)``."""
    path = Path(path)
    arrays = _read_arrays(path)
    return as_features(arrays["features"], str(path)) if "features" in arrays else load_statistics(path)


def fid_between(first, second) -> float:
    """FID where each side is features ``[N, D]`` or a ``(mu [D], sigma [D, D])`` pair (e.g. from a stats file)."""
    if not isinstance(first, tuple) and not isinstance(second, tuple):
        return fid_from_features(first, second)
    stats = [side if isinstance(side, tuple) else feature_statistics(side) for side in (first, second)]
    return frechet_distance(*stats[0], *stats[1])


def load_features(path: str | Path) -> np.ndarray:
    """``features [N, D]`` from a statistics file; KID needs them (mu/sigma alone are not enough)."""
    path = Path(path)
    arrays = _read_arrays(path)
    if "features" not in arrays:
        raise UserError(
            f"{path} holds no 'features' (only {sorted(arrays)}); KID needs per-image features: pass the image "
            "folder or a file saved with --save-stats"
        )
    return as_features(arrays["features"], str(path))
