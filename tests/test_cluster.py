"""1-D k-means and weight clustering: properties, determinism, quality against scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from sklearn.cluster import KMeans

from onnx_codebook import cluster as cl
from onnx_codebook.cluster import INITS, cluster_weight, decode, kmeans_1d
from onnx_codebook.errors import ConfigError

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)
values_st = arrays(np.float32, st.integers(1, 400), elements=finite)


def mse(x, c, labels, w=None):
    err = (np.asarray(x, np.float64) - c[labels]) ** 2
    return float(np.average(err, weights=w))


# --------------------------------------------------------------------------- kmeans_1d properties


@settings(max_examples=60, deadline=None)
@given(values_st, st.integers(1, 8), st.sampled_from(INITS), st.integers(0, 3))
def test_kmeans_properties(x, bits, init, seed):
    k = 1 << bits
    c, labels = kmeans_1d(x, k, init=init, seed=seed)
    assert c.ndim == 1 and 1 <= c.size <= k
    assert np.all(np.isfinite(c))
    assert np.all(np.diff(c) > 0)  # sorted, no duplicates
    assert labels.shape == (x.size,) and labels.min() >= 0 and labels.max() < c.size
    slack = 1e-9 * (1.0 + float(np.max(np.abs(x))))  # means of equal values may round by an ulp
    assert c.min() >= float(x.min()) - slack and c.max() <= float(x.max()) + slack
    # Every value goes to its nearest centroid.
    nearest = np.min(np.abs(x.astype(np.float64)[:, None] - c[None, :]), axis=1)
    np.testing.assert_allclose(np.abs(x - c[labels]), nearest, rtol=1e-9, atol=1e-9)
    c2, labels2 = kmeans_1d(x, k, init=init, seed=seed)
    np.testing.assert_array_equal(c2, c)
    np.testing.assert_array_equal(labels2, labels)


@settings(max_examples=60, deadline=None)
@given(st.lists(finite, min_size=1, max_size=16, unique=True), st.integers(1, 300), st.sampled_from(INITS),
       st.integers(0, 1000))
def test_exact_when_k_covers_the_distinct_values(palette, n, init, seed):
    rng = np.random.default_rng(seed)
    x = np.asarray(palette, np.float32)[rng.integers(0, len(palette), n)]
    k = max(len(set(x.tolist())), 1) + int(rng.integers(0, 3))
    c, labels = kmeans_1d(x, k, init=init, seed=seed)
    np.testing.assert_array_equal(c[labels].astype(np.float32), x)


@pytest.mark.parametrize("init", INITS)
def test_every_init_on_a_large_tensor_uses_the_histogram_path(init):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(cl.HISTOGRAM_ABOVE + 1000).astype(np.float32)
    c, labels = kmeans_1d(x, 16, init=init, seed=1)
    assert c.size == 16 and np.all(np.diff(c) > 0)
    # Final centroids are the exact means of their clusters.
    for j in (0, 7, 15):
        assert c[j] == pytest.approx(float(np.mean(x[labels == j], dtype=np.float64)), rel=1e-9, abs=1e-12)
    assert mse(x, c, labels) < 0.012  # Lloyd-Max optimum for N(0,1) at 16 levels is 0.00950
    np.testing.assert_array_equal(kmeans_1d(x, 16, init=init, seed=1)[1], labels)


def test_seed_changes_only_random_inits():
    x = np.random.default_rng(3).laplace(size=3000)
    for init in ("linear", "density", "companding"):
        np.testing.assert_array_equal(kmeans_1d(x, 8, init=init, seed=0)[0], kmeans_1d(x, 8, init=init, seed=9)[0])


def test_weighted_kmeans():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(4000)
    w = np.where(x > 1.0, 50.0, 1.0)  # the right tail matters much more
    c_w, l_w = kmeans_1d(x, 8, weights=w)
    c_u, l_u = kmeans_1d(x, 8)
    assert np.sum(c_w > 1.0) > np.sum(c_u > 1.0)  # more centroids move to the heavy region
    assert mse(x, c_w, l_w, w) < mse(x, c_u, l_u, w)
    # Against scikit-learn with the same sample weights.
    km = KMeans(8, n_init=1, random_state=0).fit(x.reshape(-1, 1), sample_weight=w)
    ref = mse(x, km.cluster_centers_[:, 0], km.labels_, w)
    assert mse(x, c_w, l_w, w) <= 1.02 * ref
    # Integer weights equal repeating the values.
    reps = rng.integers(1, 4, x.size)
    c_r, _ = kmeans_1d(np.repeat(x, reps), 8, init="linear")
    c_i, _ = kmeans_1d(x, 8, weights=reps.astype(float), init="linear")
    np.testing.assert_allclose(c_i, c_r, rtol=1e-6, atol=1e-9)
    # Zero weights are allowed (values that do not matter still get a label).
    z = np.zeros_like(x)
    z[:100] = 1
    c_z, l_z = kmeans_1d(x, 4, weights=z)
    assert l_z.max() < c_z.size


DISTRIBUTIONS = {
    "gaussian": lambda rng, n: rng.standard_normal(n) * 0.05,
    "laplace": lambda rng, n: rng.laplace(size=n) * 0.02,
    "student_t3": lambda rng, n: rng.standard_t(3, n) * 0.03,
    "bimodal": lambda rng, n: np.concatenate([rng.normal(-0.1, 0.02, n // 2), rng.normal(0.15, 0.05, n - n // 2)]),
}
# Our default (best of three seedings, converged Lloyd) against one k-means++ run of scikit-learn:
# measured ratios are 0.96-1.03; 3% above the reference is the most we accept.
MSE_TOLERANCE = 1.03


@pytest.mark.parametrize("k", [4, 16, 64])
@pytest.mark.parametrize("dist", sorted(DISTRIBUTIONS))
def test_mse_not_worse_than_sklearn(dist, k):
    rng = np.random.default_rng(11)
    x = DISTRIBUTIONS[dist](rng, 12000).astype(np.float32)
    c, labels = kmeans_1d(x, k)
    km = KMeans(k, n_init=1, random_state=0).fit(x.reshape(-1, 1).astype(np.float64))
    ref = mse(x, km.cluster_centers_[:, 0], km.labels_)
    assert mse(x, c, labels) <= MSE_TOLERANCE * ref


def test_bad_arguments():
    with pytest.raises(ConfigError):
        kmeans_1d(np.ones(3), 0)
    with pytest.raises(ConfigError, match="init"):
        kmeans_1d(np.ones(3), 2, init="random")
    with pytest.raises(ConfigError, match="empty"):
        kmeans_1d(np.zeros(0), 2)
    with pytest.raises(ConfigError, match="NaN"):
        kmeans_1d(np.array([1.0, np.nan]), 2)
    with pytest.raises(ConfigError):
        kmeans_1d(np.ones(3), 2, weights=np.array([1.0, -1.0, 1.0]))
    with pytest.raises(ConfigError):
        kmeans_1d(np.ones(3), 2, weights=np.ones(2))


def test_constant_input():
    c, labels = kmeans_1d(np.full(100_000, 0.25, np.float32), 16)
    np.testing.assert_array_equal(c, [0.25])
    assert not labels.any()


# --------------------------------------------------------------------------- cluster_weight


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("axis, group_size", [(0, None), (0, 1), (0, 3), (1, 1), (1, 4), (3, 2)])
def test_cluster_weight_granularities(axis, group_size, init):
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((10, 6, 3, 3)) * np.linspace(0.1, 1, 10).reshape(-1, 1, 1, 1)).astype(np.float32)
    res = cluster_weight(w, 3, axis=axis, group_size=group_size, init=init)
    channels = w.shape[axis]
    gs = channels if group_size is None else group_size
    groups = -(-channels // gs)  # the last group is shorter when gs does not divide channels
    assert (res.groups, res.group_size, res.axis) == (groups, gs, axis)
    assert res.codebook.dtype == np.float32 and res.codebook.shape[1] <= 8
    assert np.all(np.diff(res.codebook, axis=1) >= 0) and np.all(np.isfinite(res.codebook))
    assert res.indices.shape == w.shape and res.indices.dtype == np.uint8 and res.indices.max() < res.k
    decoded = res.decode()
    np.testing.assert_array_equal(decoded, decode(res.codebook, res.indices, axis, gs))
    # Each group is clustered on its own channels, as well as kmeans_1d clusters them (5% slack).
    moved_w, moved_d = np.moveaxis(w, axis, 0), np.moveaxis(decoded, axis, 0)
    for g in range(groups):
        block = moved_w[g * gs:(g + 1) * gs].reshape(-1)
        got = moved_d[g * gs:(g + 1) * gs].reshape(-1)
        assert np.unique(got).size <= 8
        c, labels = kmeans_1d(block, 8, init=init, seed=g)
        assert mse(block, got.astype(np.float64), np.arange(block.size)) <= 1.05 * mse(block, c, labels) + 1e-12
    assert np.mean((decoded - w) ** 2) < 0.08 * np.mean(w**2)  # 3-bit Lloyd-Max on N(0,1): 0.035


def test_finer_granularity_is_not_worse():
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((16, 32)) * rng.uniform(0.01, 1, (16, 1))).astype(np.float32)
    err = {gs: np.mean((cluster_weight(w, 3, axis=0, group_size=gs).decode() - w) ** 2) for gs in (16, 4, 1)}
    assert err[1] <= err[4] * 1.001 <= err[16] * 1.002


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 8), st.integers(1, 12), st.integers(1, 12), st.integers(0, 1000))
def test_cluster_weight_exact_for_few_values(bits, channels, group_size, seed):
    rng = np.random.default_rng(seed)
    palette = rng.standard_normal(1 << bits).astype(np.float32)
    w = palette[rng.integers(0, palette.size, (channels, 5))]
    res = cluster_weight(w, bits, axis=0, group_size=group_size, seed=seed)
    np.testing.assert_array_equal(res.decode(), w)


def test_binary_scheme():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((10, 8, 3, 3)).astype(np.float32)
    res = cluster_weight(w, 1, axis=0, group_size=4, method="binary")
    assert res.codebook.shape == (3, 2)  # groups of 4, 4, 2 filters
    for g, sl in enumerate((slice(0, 4), slice(4, 8), slice(8, 10))):
        scale = np.mean(np.abs(w[sl]), dtype=np.float64)
        np.testing.assert_allclose(res.codebook[g], [-scale, scale], rtol=1e-6)
        np.testing.assert_allclose(res.decode()[sl], np.where(w[sl] >= 0, scale, -scale), rtol=1e-6)
    # mean|W| is the L2-optimal scale of a sign code: nudging it only makes things worse.
    best = np.sum((res.decode() - w) ** 2)
    for factor in (0.95, 1.05):
        scaled = res.codebook * factor
        assert np.sum((decode(scaled, res.indices, 0, 4) - w) ** 2) > best


def test_importance_weights_the_error():
    rng = np.random.default_rng(6)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    imp = np.ones_like(w)
    imp[:, :8] = 1000.0  # the first columns see large activations
    plain = cluster_weight(w, 2, axis=0, group_size=1)
    aware = cluster_weight(w, 2, axis=0, group_size=1, importance=imp)
    err = lambda r: float(np.sum(imp * (r.decode() - w) ** 2))  # noqa: E731
    assert err(aware) < err(plain)


def test_cluster_weight_rejects_bad_settings():
    w = np.ones((4, 4), np.float32)
    for bits in (0, 9):
        with pytest.raises(ConfigError, match="bits"):
            cluster_weight(w, bits)
    with pytest.raises(ConfigError, match="method"):
        cluster_weight(w, 2, method="ternary")
