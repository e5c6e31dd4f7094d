"""Statistics over image features: FID's Frechet distance, KID, precision/recall and
Inception Score.

Everything here works on float64 numpy arrays of features, shape (N, D), or class probabilities,
shape (N, C); which network produced them is the feature extractors' business.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.special import xlogy

from ..atomic import atomic_path
from ..errors import UserError


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray,
                     mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2}).

    tr((sigma1 sigma2)^{1/2}) is the sum of the square roots of the eigenvalues of sigma1 @ sigma2,
    with their real parts clipped at 0. It equals the trace of scipy.linalg.sqrtm(sigma1 @ sigma2)
    but stays stable when the covariances are singular (fewer samples than dimensions), where sqrtm
    returns complex or inaccurate results and pytorch-fid has to add an epsilon to the diagonal.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = (np.atleast_2d(np.asarray(sigma1, np.float64)),
                      np.atleast_2d(np.asarray(sigma2, np.float64)))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    # The product of two PSD matrices has real non-negative eigenvalues; round-off can leave tiny
    # imaginary parts or negative values, which carry no information.
    eig = np.linalg.eigvals(sigma1 @ sigma2)
    tr_covmean = np.sqrt(np.clip(eig.real, 0.0, None)).sum()
    # a distance: the round-off that leaves identical statistics a hair below 0 is not one (NaN
    # stays NaN, to be seen)
    distance = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)
    return 0.0 if distance < 0 else distance


@dataclass(eq=False)  # arrays make the generated __eq__ ambiguous
class FeatureStats:
    """Mean and covariance of a feature set, the part of it that FID needs.

    `n` is the number of samples they came from, or None when unknown (pytorch-fid's files
    record only mu and sigma).
    """

    mu: np.ndarray
    sigma: np.ndarray
    n: int | None = None

    @classmethod
    def from_features(cls, feats: np.ndarray) -> FeatureStats:
        feats = _features(feats, "features")
        if len(feats) < 2:
            raise UserError(f"need at least 2 feature vectors for a covariance, got {len(feats)}")
        return cls(feats.mean(axis=0), np.cov(feats, rowvar=False).reshape(feats.shape[1], -1),
                   len(feats))

    def save(self, path: str | Path, **extra: np.ndarray) -> None:
        """Writes an .npz (mu, sigma, n if known, and `extra` arrays) atomically, readable by
        pytorch-fid too."""
        arrays = {**extra, "mu": np.asarray(self.mu, np.float64),
                  "sigma": np.asarray(self.sigma, np.float64)}
        if self.n is not None:
            arrays["n"] = np.asarray(self.n, np.int64)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)  # a file object, so numpy does not append ".npz" to the name

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        """Reads a file written by `save` or by pytorch-fid (`--save-stats`: keys mu and sigma)."""
        bad = (f"{path} is not a feature statistics file "
               f"(expected an .npz with arrays 'mu' and 'sigma')")
        try:
            data = np.load(path, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):  # a plain .npy loads as one array
                raise UserError(bad)
            with data:
                if not {"mu", "sigma"} <= set(data.files):
                    raise UserError(bad)
                mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
                n = int(data["n"]) if "n" in data.files else None
        except (OSError, ValueError, TypeError, EOFError, zipfile.BadZipFile) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"cannot read feature statistics {path}: {reason}") from None
        if mu.ndim != 1 or sigma.shape != mu.shape * 2:
            raise UserError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not fit together")
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all() and _covariance(sigma)):
            raise UserError(f"{path}: its mu or sigma holds values no feature statistics have "
                            f"(not finite, or sigma not a covariance): compute it again")
        return cls(mu, sigma, n)


def _covariance(sigma: np.ndarray) -> bool:
    """Symmetric and positive semi-definite, to rounding."""
    if not np.allclose(sigma, sigma.T, rtol=1e-5, atol=1e-8 * (np.abs(sigma).max() + 1e-30)):
        return False
    eig = np.linalg.eigvalsh(sigma) if len(sigma) else np.zeros(1)
    return bool(eig.min() >= -1e-6 * max(abs(eig.max()), 1e-30))


def kid(feats_real: np.ndarray, feats_gen: np.ndarray, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018): mean and std over random subsets of the
    unbiased MMD^2 estimate with the kernel k(x, y) = (x.y / D + 1)^3.

    Each subset draws min(subset_size, len(real), len(gen)) rows of each set without replacement
    from numpy's default_rng(seed). The within-set kernel sums leave out the diagonal k(x, x), as
    torch-fidelity and the paper do, so the mean can be slightly negative for equal distributions.
    When both sets are no larger than a subset, every subset is the whole of both: the std is NaN
    (reported as null), not a precise-looking 0.
    """
    real, gen = _features(feats_real, "real features"), _features(feats_gen, "generated features")
    if real.shape[1] != gen.shape[1]:
        raise ValueError(f"feature dimensions differ: {real.shape[1]} vs {gen.shape[1]}")
    m = min(subset_size, len(real), len(gen))
    if m < 2:
        raise UserError(f"KID needs at least 2 samples in each set, "
                        f"got {len(real)} real and {len(gen)} generated")
    dim = real.shape[1]
    rng = np.random.default_rng(seed)
    mmds = np.empty(subsets)
    for i in range(subsets):
        x = real[rng.choice(len(real), m, replace=False)]
        y = gen[rng.choice(len(gen), m, replace=False)]
        k_xx, k_yy, k_xy = ((a @ b.T / dim + 1.0) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        within = k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)
        mmds[i] = within / (m * (m - 1)) - 2.0 * k_xy.sum() / (m * m)
    whole = m == len(real) and m == len(gen)
    return float(mmds.mean()), float("nan") if whole else float(mmds.std())


def precision_recall(feats_real: np.ndarray, feats_gen: np.ndarray, k: int = 3,
                     chunk: int = 1000) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019).

    A set's manifold is the union of balls around its points, each with the radius of that point's
    k-th nearest neighbour in the set (itself excluded). precision is the share of generated samples
    inside the real manifold, recall the share of real samples inside the generated one. Distances
    go in blocks of `chunk` rows, so 10,000 x 10,000 sets need only chunk x N floats at a time.
    """
    real, gen = _features(feats_real, "real features"), _features(feats_gen, "generated features")
    if real.shape[1] != gen.shape[1]:
        raise ValueError(f"feature dimensions differ: {real.shape[1]} vs {gen.shape[1]}")
    if min(len(real), len(gen)) <= k:
        raise UserError(f"precision/recall with k={k} needs more than {k} samples in each set, "
                        f"got {len(real)} real and {len(gen)} generated")
    real_t, gen_t = torch.from_numpy(real), torch.from_numpy(gen)
    real_r2, gen_r2 = _knn_radii2(real_t, k, chunk), _knn_radii2(gen_t, k, chunk)
    precision = _inside(gen_t, real_t, real_r2, chunk).double().mean().item()
    recall = _inside(real_t, gen_t, gen_r2, chunk).double().mean().item()
    return precision, recall


def inception_score(probs: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Inception Score (Salimans et al. 2016) from class probabilities p(y|x), shape (N, C).

    The rows are cut into `splits` consecutive parts, as in the original code and torch-fidelity
    (which also shuffles first); each part scores exp(mean_x KL(p(y|x) || p(y))) with p(y) the
    part's mean. Returns the mean and (population) std over the parts.
    """
    p = _features(probs, "class probabilities")
    if len(p) < splits:
        raise UserError(f"Inception Score with {splits} splits needs at least {splits} samples, "
                        f"got {len(p)}")
    scores = []
    for i in range(splits):
        part = p[i * len(p) // splits:(i + 1) * len(p) // splits]
        q = part.mean(axis=0, keepdims=True)
        # xlogy makes 0 * log 0 = 0, so exact one-hot predictions work (a class q gives 0 has p = 0)
        kl = (xlogy(part, part) - xlogy(part, q)).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _features(a: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(a, np.float64)
    if a.ndim != 2:
        raise ValueError(f"{what} must have shape (N, D), got {a.shape}")
    return a


def _dist2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # Squared distances through one matmul; float64 keeps cancellation error far below any radius.
    return ((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T).clamp_(min=0.0)


def _knn_radii2(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Squared distance of every row to its k-th nearest neighbour in x, itself excluded."""
    out = torch.empty(len(x), dtype=x.dtype)
    for s in range(0, len(x), chunk):
        d2 = _dist2(x[s:s + chunk], x)
        # Rank k+1 skips the point itself (distance 0); duplicates of it still count as neighbours.
        out[s:s + chunk] = d2.kthvalue(k + 1, dim=1).values
    return out


def _inside(query: torch.Tensor, ref: torch.Tensor, ref_r2: torch.Tensor,
            chunk: int) -> torch.Tensor:
    """Whether each query row lies within the radius of at least one ref row."""
    out = torch.empty(len(query), dtype=torch.bool)
    for s in range(0, len(query), chunk):
        out[s:s + chunk] = (_dist2(query[s:s + chunk], ref) <= ref_r2[None, :]).any(dim=1)
    return out
