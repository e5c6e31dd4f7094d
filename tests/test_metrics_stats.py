"""Numeric checks of the metric statistics against closed forms and independent implementations."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from ddpmkit.errors import UserError
from ddpmkit.metrics.stats import (FeatureStats, frechet_distance, inception_score, kid,
                                   precision_recall)


def _spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _fd_sqrtm(mu1, s1, mu2, s2) -> float:
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


# --- Frechet distance ---------------------------------------------------------------------------

def test_fd_matches_sqrtm_closed_form():
    rng = np.random.default_rng(0)
    for d in (1, 3, 16):
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        s1, s2 = _spd(rng, d), _spd(rng, d)
        assert np.count_nonzero(s1 - np.diag(np.diag(s1))) > 0 or d == 1
        expected = _fd_sqrtm(mu1, s1, mu2, s2)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_fd_known_value_commuting_covariances():
    # Same rotation, eigenvalues (1, 4) and (4, 9):
    # tr term = (1+4) + (4+9) - 2*(2+6) = 2, mean term 3^2+4^2.
    q, _ = np.linalg.qr(np.array([[1.0, 2.0], [3.0, -1.0]]))
    s1, s2 = q @ np.diag([1.0, 4.0]) @ q.T, q @ np.diag([4.0, 9.0]) @ q.T
    assert (frechet_distance(np.zeros(2), s1, np.array([3.0, 4.0]), s2)
            == pytest.approx(27.0, rel=1e-10))


def test_fd_identical_stats_is_zero_even_when_singular():
    rng = np.random.default_rng(1)
    mu, s = rng.normal(size=8), _spd(rng, 8)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-6
    feats = rng.normal(size=(5, 32))  # fewer samples than dimensions: rank-4 covariance
    st = FeatureStats.from_features(feats)
    assert np.linalg.matrix_rank(st.sigma) < 32
    # Each of the 28 zero eigenvalues of sigma @ sigma comes out as round-off ~1e-16 * |sigma|^2,
    # whose square root is ~1e-8: the error grows like D * sqrt(eps), still negligible next to
    # any real FID.
    assert abs(frechet_distance(st.mu, st.sigma, st.mu, st.sigma)) < 1e-5


def test_fd_from_samples_small_for_same_gaussian_and_grows_with_mean_shift():
    rng = np.random.default_rng(2)
    d, n = 4, 20000
    cov = _spd(rng, d)
    chol = np.linalg.cholesky(cov)

    def draw(shift):
        return rng.normal(size=(n, d)) @ chol.T + shift

    ref = FeatureStats.from_features(draw(0.0))
    same = FeatureStats.from_features(draw(0.0))
    assert frechet_distance(ref.mu, ref.sigma, same.mu, same.sigma) < 0.01
    direction = np.array([1.0, -2.0, 0.5, 1.0]) / np.sqrt(6.25)
    for scale in (1.0, 2.0, 4.0):
        other = FeatureStats.from_features(draw(scale * direction))
        fd = frechet_distance(ref.mu, ref.sigma, other.mu, other.sigma)
        assert fd == pytest.approx(scale ** 2, rel=0.05, abs=0.02)


# --- FeatureStats -------------------------------------------------------------------------------

def test_feature_stats_from_features_and_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    feats = rng.normal(size=(50, 6)).astype(np.float32)
    st = FeatureStats.from_features(feats)
    assert st.n == 50 and st.mu.dtype == np.float64 and st.sigma.shape == (6, 6)
    np.testing.assert_allclose(st.mu, feats.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(st.sigma, np.cov(feats.astype(np.float64).T), rtol=1e-12)

    path = tmp_path / "sub" / "stats.npz"
    st.save(path)
    # no temporary left behind
    assert sorted(p.name for p in path.parent.iterdir()) == ["stats.npz"]
    back = FeatureStats.load(path)
    assert back.n == 50
    np.testing.assert_array_equal(back.mu, st.mu)
    np.testing.assert_array_equal(back.sigma, st.sigma)

    # A name without .npz stays as given (numpy would otherwise append the suffix).
    st.save(tmp_path / "stats.bin")
    assert (tmp_path / "stats.bin").exists() and FeatureStats.load(tmp_path / "stats.bin").n == 50


def test_feature_stats_loads_pytorch_fid_file(tmp_path):
    mu, sigma = np.arange(3.0), np.eye(3)
    np.savez(tmp_path / "fid.npz", mu=mu, sigma=sigma)  # what pytorch-fid --save-stats writes
    st = FeatureStats.load(tmp_path / "fid.npz")
    assert st.n is None
    np.testing.assert_array_equal(st.mu, mu)
    np.testing.assert_array_equal(st.sigma, sigma)


@pytest.mark.parametrize("kind", ["missing", "text", "npy", "wrong_keys", "pickled", "bad_shapes"])
def test_feature_stats_bad_file_raises_user_error(tmp_path, kind):
    path = tmp_path / "bad.npz"
    if kind == "text":
        path.write_text("not numpy\n")
    elif kind == "npy":
        with open(path, "wb") as f:
            np.save(f, np.zeros(3))
    elif kind == "wrong_keys":
        np.savez(path, mean=np.zeros(3), cov=np.eye(3))
    elif kind == "pickled":
        np.savez(path, mu=np.array([{"a": 1}], dtype=object), sigma=np.eye(1))
    elif kind == "bad_shapes":
        np.savez(path, mu=np.zeros(3), sigma=np.eye(4))
    with pytest.raises(UserError) as info:
        FeatureStats.load(path)
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg


# --- KID ----------------------------------------------------------------------------------------

def _mmd2_loops(x: np.ndarray, y: np.ndarray, biased: bool = False) -> float:
    """MMD^2 by the definition, one kernel value at a time."""
    d, m = x.shape[1], len(x)

    def k(a, b):
        return (a @ b / d + 1.0) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if biased or i != j)
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if biased or i != j)
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    within = m * m if biased else m * (m - 1)
    return (xx + yy) / within - 2 * xy / (m * m)


def test_kid_matches_definition_on_whole_sets():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(30, 5)), rng.normal(0.3, 1.2, size=(30, 5))
    # A subset of the full size is a permutation, which leaves MMD^2 unchanged, so every subset
    # agrees: there is no spread to report (NaN), rather than a precise-looking 0.
    mean, std = kid(x, y, subsets=3, subset_size=1000)
    assert mean == pytest.approx(_mmd2_loops(x, y), rel=1e-10)
    assert np.isnan(std)


def test_kid_same_distribution_near_zero_and_unbiased():
    rng = np.random.default_rng(5)
    d, m, subsets = 8, 100, 10
    x, y = rng.normal(size=(400, d)), rng.normal(size=(400, d))
    mean, std = kid(x, y, subsets=subsets, subset_size=m, seed=1)
    assert abs(mean) < 3 * std / np.sqrt(subsets) + 1e-3

    # Over fresh draws the unbiased estimate averages to 0; the biased one (diagonal kept) sits
    # about 2/m * E[k(x,x) - k(x,y)] above it.
    unbiased, biased = [], []
    for seed in range(20):
        r = np.random.default_rng(100 + seed)
        x, y = r.normal(size=(m, d)), r.normal(size=(m, d))
        unbiased.append(kid(x, y, subsets=1, subset_size=m)[0])
        k_xx, k_yy, k_xy = ((a @ b.T / d + 1.0) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        biased.append((k_xx.sum() + k_yy.sum() - 2 * k_xy.sum()) / m**2)
    unbiased, biased = np.array(unbiased), np.array(biased)
    sem = unbiased.std(ddof=1) / np.sqrt(len(unbiased))
    assert abs(unbiased.mean()) < 3 * sem
    assert biased.mean() > 0.1 and abs(unbiased.mean()) < 0.1 * biased.mean()


def test_kid_different_distributions_clearly_positive():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(300, 8)), rng.normal(0.5, 1.0, size=(300, 8))
    mean, std = kid(x, y, subsets=10, subset_size=100)
    same, _ = kid(x, rng.normal(size=(300, 8)), subsets=10, subset_size=100)
    assert mean > 0 and mean > 10 * std / np.sqrt(10)
    assert mean > 10 * abs(same)


def test_kid_subset_draws_are_seeded():
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(60, 4)), rng.normal(size=(50, 4))
    assert (kid(x, y, subsets=5, subset_size=20, seed=3)
            == kid(x, y, subsets=5, subset_size=20, seed=3))
    assert (kid(x, y, subsets=5, subset_size=20, seed=3)
            != kid(x, y, subsets=5, subset_size=20, seed=4))


# --- precision / recall -------------------------------------------------------------------------

def test_precision_recall_identical_sets():
    x = np.random.default_rng(8).normal(size=(200, 5))
    assert precision_recall(x, x.copy(), k=3) == (1.0, 1.0)


def test_precision_recall_far_apart_sets():
    rng = np.random.default_rng(9)
    x, y = rng.normal(size=(200, 5)), rng.normal(size=(200, 5)) + 1000.0
    assert precision_recall(x, y, k=3) == (0.0, 0.0)


def test_precision_recall_half_the_modes():
    rng = np.random.default_rng(10)
    centers = np.array([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0], [100.0, 100.0]])
    real = centers[np.arange(800) % 4] + rng.normal(size=(800, 2))
    gen = centers[np.arange(800) % 2] + rng.normal(size=(800, 2))
    # Small chunks exercise the blocked distance computation.
    precision, recall = precision_recall(real, gen, k=3, chunk=128)
    assert precision > 0.9
    assert 0.4 < recall <= 0.5


def test_precision_recall_matches_brute_force():
    rng = np.random.default_rng(11)
    real, gen, k = rng.normal(size=(60, 3)), rng.normal(0.5, 1.5, size=(50, 3)), 3

    def manifold(ref, query):
        d_ref = np.linalg.norm(ref[:, None] - ref[None], axis=-1)
        radii = np.sort(d_ref, axis=1)[:, k]
        d = np.linalg.norm(query[:, None] - ref[None], axis=-1)
        return (d <= radii[None]).any(1).mean()

    p, r = precision_recall(real, gen, k=k, chunk=7)
    assert p == pytest.approx(manifold(real, gen), abs=1e-12)
    assert r == pytest.approx(manifold(gen, real), abs=1e-12)


# --- Inception Score ----------------------------------------------------------------------------

def test_inception_score_uniform_is_one():
    mean, std = inception_score(np.full((100, 10), 0.1), splits=10)
    assert mean == pytest.approx(1.0, abs=1e-12) and std < 1e-12


def test_inception_score_confident_even_predictions_give_num_classes():
    c = 7
    probs = np.eye(c)[np.arange(10 * 3 * c) % c]  # every split holds each class equally often
    mean, std = inception_score(probs, splits=10)
    assert mean == pytest.approx(c, rel=1e-12) and std < 1e-9


def test_inception_score_matches_reference_formula():
    rng = np.random.default_rng(12)
    probs = rng.dirichlet(np.full(5, 0.3), size=40)
    scores = []
    for part in np.array_split(probs, 4):  # 40 rows into 4 splits: the same cut points
        py = part.mean(0)
        scores.append(np.exp(np.mean([np.sum(p * np.log(p / py)) for p in part])))
    assert (inception_score(probs, splits=4)
            == pytest.approx((np.mean(scores), np.std(scores)), rel=1e-10))


def test_the_frechet_distance_of_identical_singular_statistics_is_not_negative():
    # fewer samples than dimensions: round-off in the eigenvalues left it at -3e-6
    for seed in range(20):
        x = np.random.default_rng(seed).normal(size=(10, 64))
        mu, sigma = x.mean(0), np.cov(x, rowvar=False)
        assert 0.0 <= frechet_distance(mu, sigma, mu, sigma) < 1e-6
    assert np.isnan(frechet_distance(np.array([np.nan, 0.0]), np.eye(2), np.zeros(2), np.eye(2)))
