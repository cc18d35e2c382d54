"""Weight clustering: array -> (codebook, indices).  Pure numpy, no I/O.

1-D k-means is solved on the *sorted* values: with prefix sums of the (weighted)
values, one Lloyd iteration costs O(k log n) — the cluster of a centroid is a
contiguous run of sorted values between two centroid midpoints, located with
``searchsorted``, and its mean comes from two prefix-sum lookups.  Only the final
assignment touches every weight (``searchsorted`` of the weights on the
midpoints, O(n log k)).  ``sklearn.cluster.KMeans`` is the reference the tests and
the benchmark compare against.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ConfigError

INITS = ("auto", "companding", "density", "linear", "kmeans++")
# "auto" runs these seedings and keeps the clustering with the lowest error.
AUTO_INITS = ("companding", "density", "kmeans++")
METHODS = ("kmeans", "binary")
# Above this many values, k-means runs on a fine histogram instead of sorted values.
HISTOGRAM_ABOVE = 1 << 16
HISTOGRAM_BINS = 1 << 16


@dataclass(frozen=True)
class Clustering:
    """Result of clustering one weight tensor.

    ``codebook`` is float32 ``[G, k]`` (rows sorted ascending), ``indices`` is
    uint8 with the weight's shape; see :mod:`onnx_codebook.schema` for the layout.
    """

    codebook: np.ndarray
    indices: np.ndarray
    axis: int
    group_size: int

    @property
    def k(self) -> int:
        return int(self.codebook.shape[1])

    @property
    def groups(self) -> int:
        return int(self.codebook.shape[0])

    def decode(self) -> np.ndarray:
        """The float32 weight the codebook represents."""
        return decode(self.codebook, self.indices, self.axis, self.group_size)


def decode(codebook: np.ndarray, indices: np.ndarray, axis: int, group_size: int) -> np.ndarray:
    moved = np.moveaxis(indices, axis, 0)
    rows = np.arange(moved.shape[0]) // group_size
    rows = rows.reshape((-1,) + (1,) * (moved.ndim - 1))
    return np.moveaxis(codebook[rows, moved.astype(np.intp)], 0, axis).astype(np.float32)


def _init_centroids(pts: np.ndarray, pw: np.ndarray, k: int, init: str, rng) -> np.ndarray:
    """Initial centroids for sorted points ``pts`` with weights ``pw``."""
    if init == "linear":
        return np.linspace(pts[0], pts[-1], k)
    if init in ("density", "companding"):
        if init == "density":
            mass = pw
        else:
            # Asymptotically MSE-optimal point density is proportional to p(x)^(1/3):
            # place centroids at quantiles of the cube-root density (tails get more).
            nbins = int(min(4096, max(16, pts.size)))
            edges = np.linspace(pts[0], pts[-1], nbins + 1)
            b = np.clip(np.searchsorted(edges, pts, side="right") - 1, 0, nbins - 1)
            dens = np.bincount(b, weights=pw, minlength=nbins)
            mass = np.cbrt(dens)[b] / np.maximum(np.bincount(b, minlength=nbins)[b], 1)
        cm = np.cumsum(mass)
        targets = (np.arange(k) + 0.5) / k * cm[-1]
        return pts[np.minimum(np.searchsorted(cm, targets), pts.size - 1)]
    if init == "kmeans++":
        # Greedy weighted k-means++: of a few D^2-sampled candidates per step, keep
        # the one that lowers the potential most.
        trials = 2 + int(np.log(k))
        centers = [pts[rng.choice(pts.size, p=pw / pw.sum())]]
        d2 = (pts - centers[0]) ** 2 * pw
        for _ in range(1, k):
            total = d2.sum()
            if total <= 0:
                break
            picks = np.minimum(np.searchsorted(np.cumsum(d2), rng.random(trials) * total), pts.size - 1)
            cand = np.minimum(d2[None, :], (pts[None, :] - pts[picks][:, None]) ** 2 * pw[None, :])
            best = int(np.argmin(cand.sum(axis=1)))
            centers.append(pts[picks[best]])
            d2 = cand[best]
        return np.sort(np.asarray(centers))
    raise ConfigError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")


def _lloyd(pts: np.ndarray, pw: np.ndarray, c: np.ndarray, max_iter: int, tol: float) -> np.ndarray:
    """Lloyd iterations on sorted weighted points; O(k log n) per iteration."""
    cw, cwx, cwxx = np.cumsum(pw), np.cumsum(pw * pts), np.cumsum(pw * pts * pts)
    zero = np.zeros(1)
    cw, cwx, cwxx = (np.concatenate((zero, a)) for a in (cw, cwx, cwxx))
    span = float(pts[-1] - pts[0]) or 1.0
    c = np.sort(c)
    for _ in range(max_iter):
        mids = (c[1:] + c[:-1]) / 2
        bounds = np.concatenate(([0], np.searchsorted(pts, mids, side="right"), [pts.size]))
        lo, hi = bounds[:-1], bounds[1:]
        sw, swx, swxx = cw[hi] - cw[lo], cwx[hi] - cwx[lo], cwxx[hi] - cwxx[lo]
        empty = sw <= 0
        new_c = np.where(empty, c, swx / np.where(empty, 1, sw))
        if empty.any():
            # Re-seed each empty centroid inside the cluster with the largest error.
            sse = np.maximum(swxx - swx * swx / np.where(empty, 1, sw), 0)
            for j in np.flatnonzero(empty):
                worst = int(np.argmax(sse))
                a, b = bounds[worst], bounds[worst + 1]
                if b - a < 2:
                    break
                new_c[j] = pts[(a + b) // 2]
                sse[worst] = 0
        new_c = np.sort(new_c)
        moved = float(np.max(np.abs(new_c - c)))
        c = new_c
        if moved <= tol * span:
            break
    return c


def _sse(pts: np.ndarray, pw: np.ndarray, c: np.ndarray) -> float:
    mids = (c[1:] + c[:-1]) / 2
    return float(np.sum(pw * (pts - c[np.searchsorted(mids, pts, side="right")]) ** 2))


def _fit(pts: np.ndarray, pw: np.ndarray, k: int, init: str, seed: int, max_iter: int, tol: float) -> np.ndarray:
    """Centroids for sorted weighted points; ``init="auto"`` keeps the best of several seedings."""
    if init != "auto":
        return _lloyd(pts, pw, _init_centroids(pts, pw, k, init, np.random.default_rng(seed)), max_iter, tol)
    fits = [_fit(pts, pw, k, name, seed, max_iter, tol) for name in AUTO_INITS]
    # Extra k-means++ draws: Lloyd's local optimum depends on the seeding, and these are cheap.
    fits += [_fit(pts, pw, k, "kmeans++", seed + d, max_iter, tol) for d in (1, 2)]
    return min(fits, key=lambda c: _sse(pts, pw, c))


def kmeans_1d(
    values: np.ndarray,
    k: int,
    *,
    init: str = "auto",
    weights: np.ndarray | None = None,
    max_iter: int = 500,
    tol: float = 1e-7,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted 1-D k-means.

    Returns ``(centroids, labels)``: at most ``k`` sorted float64 centroids and
    one integer label per value.  When the values take at most ``k`` distinct
    values the centroids are exactly those values (lossless).  Large inputs are
    clustered on a 65536-bin histogram of bin means; the final centroids are
    the exact (weighted) means of their clusters.  Deterministic for a ``seed``.
    """
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    if init not in INITS:
        raise ConfigError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise ConfigError("cannot cluster an empty tensor")
    if not np.all(np.isfinite(x)):
        raise ConfigError("weights contain NaN or infinity")
    w = np.ones_like(x) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape != x.shape or np.any(w < 0) or not np.all(np.isfinite(w)):
        raise ConfigError("clustering weights must be finite, non-negative and match the values")
    w = w + 1e-12 * (w.max() + 1e-30)
    lo, hi = float(x.min()), float(x.max())
    if x.size > HISTOGRAM_ABOVE and hi > lo:
        scale = HISTOGRAM_BINS / (hi - lo)
        bins = np.minimum(((x - lo) * scale).astype(np.intp), HISTOGRAM_BINS - 1)
        bw = np.bincount(bins, weights=w, minlength=HISTOGRAM_BINS)
        bwx = np.bincount(bins, weights=w * x, minlength=HISTOGRAM_BINS)
        used = np.flatnonzero(bw > 0)
        if used.size > k:
            pts, pw = bwx[used] / bw[used], bw[used]
            # Seedings are compared on the histogram; the winner is refined on the exact
            # sorted values (a uniform histogram is coarse where heavy tails stretch the range).
            c = _fit(pts, pw, k, init, seed, max_iter, tol)
            order = np.argsort(x, kind="stable")
            c = _lloyd(x[order], w[order], c, max_iter, tol)
            mids = (c[1:] + c[:-1]) / 2
            return _finalize(x, w, np.searchsorted(mids, x, side="right"), c.size)
    uniq = np.unique(x)
    if uniq.size <= k:
        return uniq, np.searchsorted(uniq, x)
    order = np.argsort(x, kind="stable")
    pts, pw = x[order], w[order]
    c = _fit(pts, pw, k, init, seed, max_iter, tol)
    mids = (c[1:] + c[:-1]) / 2
    return _finalize(x, w, np.searchsorted(mids, x, side="right"), c.size)


def _finalize(x: np.ndarray, w: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact weighted cluster means for ``labels``; empty clusters are dropped."""
    sw = np.bincount(labels, weights=w, minlength=k)
    swx = np.bincount(labels, weights=w * x, minlength=k)
    keep = sw > 0
    remap = np.cumsum(keep) - 1
    return swx[keep] / sw[keep], remap[labels]


def _row_search(sorted_rows: np.ndarray, queries: np.ndarray, side: str = "right") -> np.ndarray:
    """Per-row ``searchsorted`` of ``queries[g]`` in ``sorted_rows[g]`` (both in [0, 1]),
    as one call on the rows laid end to end (row g shifted by 2g)."""
    g, n = sorted_rows.shape
    off = 2.0 * np.arange(g)[:, None]
    pos = np.searchsorted((sorted_rows + off).ravel(), (queries + off).ravel(), side=side)
    return pos.reshape(queries.shape) - n * np.arange(g)[:, None]


def _row_quantiles(z: np.ndarray, mass: np.ndarray, k: int) -> np.ndarray:
    """Per row, the values at the (i + 0.5) / k quantiles of ``mass``."""
    cm = np.cumsum(mass, axis=1)
    cm = cm / cm[:, -1:]
    targets = np.broadcast_to((np.arange(k) + 0.5) / k, (z.shape[0], k))
    idx = np.minimum(_row_search(cm, targets, side="left"), z.shape[1] - 1)
    return np.take_along_axis(z, idx, axis=1)


def kmeans_rows(
    x: np.ndarray, k: int, *, init: str = "auto", weights: np.ndarray | None = None,
    max_iter: int = 300, tol: float = 1e-7, seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted 1-D k-means of every row of ``x`` ``[G, n]`` at once.

    Same method as :func:`kmeans_1d` (Lloyd on sorted values with prefix sums),
    vectorised over rows — per-channel and grouped codebooks of a layer are one
    call instead of one per channel.  ``init="auto"`` keeps, per row, the best of
    the companding, density, linear and (when cheap enough) greedy k-means++ seedings.  Returns ``(centroids [G, k]``
    sorted per row, ``labels [G, n])``; rows with at most ``k`` values are exact.
    """
    if init not in INITS:
        raise ConfigError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    x = np.asarray(x, dtype=np.float64)
    g, n = x.shape
    if not np.all(np.isfinite(x)):
        raise ConfigError("weights contain NaN or infinity")
    rng_seed = seed
    w = np.ones_like(x) if weights is None else np.asarray(weights, dtype=np.float64).reshape(g, n)
    if np.any(w < 0) or not np.all(np.isfinite(w)):
        raise ConfigError("clustering weights must be finite and non-negative")
    order = np.argsort(x, axis=1, kind="stable")
    xs = np.take_along_axis(x, order, axis=1)
    rows = np.arange(g)[:, None]
    if n <= k:
        cents = np.concatenate([xs, np.repeat(xs[:, -1:], k - n, axis=1)], axis=1)
        labels = np.empty((g, n), dtype=np.intp)
        labels[rows, order] = np.arange(n)[None, :]
        return cents, labels
    ws = np.take_along_axis(w, order, axis=1) + 1e-12 * (w.max() + 1e-30)
    lo = xs[:, :1]
    span = xs[:, -1:] - lo
    span[span == 0] = 1.0
    z = (xs - lo) / span
    zero = np.zeros((g, 1))
    cw = np.concatenate([zero, np.cumsum(ws, axis=1)], axis=1)
    cwx = np.concatenate([zero, np.cumsum(ws * z, axis=1)], axis=1)
    cwxx = np.concatenate([zero, np.cumsum(ws * z * z, axis=1)], axis=1)

    def sums(c):
        mids = (c[:, 1:] + c[:, :-1]) / 2
        pos = _row_search(z, mids)
        bounds = np.concatenate([np.zeros((g, 1), np.intp), pos, np.full((g, 1), n)], axis=1)
        take = lambda a: np.take_along_axis(a, bounds[:, 1:], 1) - np.take_along_axis(a, bounds[:, :-1], 1)
        return take(cw), take(cwx), take(cwxx), bounds

    def lloyd(c):
        c = np.sort(c, axis=1)
        reseeds = 0
        for _ in range(max_iter):
            sw, swx, swxx, bounds = sums(c)
            empty = sw <= 0
            new_c = np.where(empty, c, swx / np.where(empty, 1, sw))
            reseeded = False
            if empty.any() and reseeds < 8:
                # Move the i-th empty centroid of a row into the row's i-th worst cluster.
                reseeds += 1
                er = np.flatnonzero(empty.any(axis=1))
                e = empty[er]
                sse = np.where(e, -1.0, swxx[er] - swx[er] ** 2 / np.where(e, 1, sw[er]))
                worst_first = np.argsort(-sse, axis=1)
                nth = np.clip(np.cumsum(e, axis=1) - 1, 0, k - 1)
                target = np.take_along_axis(worst_first, nth, axis=1)
                a = np.take_along_axis(bounds[er], target, 1)
                b = np.take_along_axis(bounds[er], target + 1, 1)
                ok = e & (b - a >= 2)
                rr, jj = np.nonzero(ok)
                new_c[er[rr], jj] = z[er[rr], (a[rr, jj] + b[rr, jj]) // 2]
                reseeded = bool(ok.any())
            new_c = np.sort(new_c, axis=1)
            moved = np.max(np.abs(new_c - c))
            c = new_c
            if moved <= tol and not reseeded:
                break
        sw, swx, swxx, _ = sums(c)
        sse = np.sum(np.maximum(swxx - swx * swx / np.where(sw > 0, sw, 1), 0), axis=1)
        return c, sse

    def seed(name):
        if name == "linear":
            return np.broadcast_to(np.linspace(0.0, 1.0, k), (g, k)).copy()
        if name == "density":
            return _row_quantiles(z, ws, k)
        # companding: mass per value ~ p^(1/3) / p = (local spacing)^(2/3)
        h = max(1, n // (2 * k))
        idx = np.arange(n)
        gap = z[:, np.minimum(idx + h, n - 1)] - z[:, np.maximum(idx - h, 0)]
        return _row_quantiles(z, ws * (gap + 1e-12) ** (2.0 / 3.0), k)

    def kmeanspp(rng):
        # Greedy k-means++ on every row at once: per step, a few D^2-sampled
        # candidates per row, keeping the one that lowers the row's potential most.
        trials = 2 + int(np.log(k))
        ridx = np.arange(g)
        first = np.minimum(_row_search(np.cumsum(ws, 1) / np.sum(ws, 1, keepdims=True),
                                       rng.random((g, 1)), side="left"), n - 1)
        centers = [np.take_along_axis(z, first, 1)[:, 0]]
        d2 = (z - centers[0][:, None]) ** 2 * ws
        for _ in range(1, k):
            cum = np.cumsum(d2, axis=1)
            total = cum[:, -1:]
            safe = np.where(total > 0, total, 1)
            picks = np.minimum(_row_search(cum / safe, rng.random((g, trials)), side="left"), n - 1)
            cand = np.take_along_axis(z, picks, 1)  # [g, trials]
            pot = np.minimum(d2[:, None, :], (z[:, None, :] - cand[:, :, None]) ** 2 * ws[:, None, :])
            best = np.argmin(pot.sum(axis=2), axis=1)
            centers.append(cand[ridx, best])
            d2 = pot[ridx, best]
        return np.stack(centers, axis=1)

    names = {"auto": ("companding", "density", "linear"), "kmeans++": ()}.get(init, (init,))
    # k-means++ seeding costs O(k^2 n) per row: part of "auto" only while that stays cheap.
    cost = k * k * (2 + np.log(k)) * n * g
    draws = int(min(3, 4e8 // max(cost, 1)))
    if init == "kmeans++":
        draws = max(draws, 1)
    runs = [lloyd(seed(name)) for name in names]
    rng = np.random.default_rng(rng_seed)
    runs.extend(lloyd(kmeanspp(rng)) for _ in range(draws))
    best_c, best_sse = runs[0]
    for c, sse in runs[1:]:
        better = sse < best_sse
        best_c[better], best_sse[better] = c[better], sse[better]
    mids = (best_c[:, 1:] + best_c[:, :-1]) / 2
    zq = (x - lo) / span
    labels = np.minimum(_row_search(np.sort(mids, axis=1), zq.clip(0, 1)) if k > 1 else np.zeros_like(x, np.intp), k - 1)
    # Final centroids: exact weighted means of their members (empty ones keep their place).
    flat = (rows * k + labels).ravel()
    sw = np.bincount(flat, weights=w.ravel() + 1e-300, minlength=g * k).reshape(g, k)
    swx = np.bincount(flat, weights=(w * x).ravel(), minlength=g * k).reshape(g, k)
    filled = sw > 0
    means = swx / np.where(filled, sw, 1)
    # Empty clusters (never indexed) copy the nearest filled entry below (or above), so rows stay sorted.
    src = np.maximum.accumulate(np.where(filled, np.arange(k)[None, :], -1), axis=1)
    first = np.argmax(filled, axis=1)[:, None]
    src = np.where(src < 0, first, src)
    cents = np.take_along_axis(means, src, axis=1)
    # Rows with at most k distinct values are reproduced exactly.
    distinct = 1 + np.count_nonzero(np.diff(xs, axis=1), axis=1)
    for r in np.flatnonzero(distinct <= k):
        uniq = np.unique(xs[r])
        cents[r] = np.pad(uniq, (0, k - uniq.size), mode="edge")
        labels[r] = np.searchsorted(uniq, x[r])
    return cents, labels


def _groups(weight: np.ndarray, axis: int, group_size: int):
    """Yield (group index, slice of the channel axis) for each codebook row."""
    channels = weight.shape[axis]
    for g, start in enumerate(range(0, channels, group_size)):
        yield g, slice(start, min(start + group_size, channels))


def cluster_weight(
    weight: np.ndarray,
    bits: int,
    *,
    axis: int = 0,
    group_size: int | None = None,
    method: str = "kmeans",
    init: str = "auto",
    importance: np.ndarray | None = None,
    seed: int = 0,
) -> Clustering:
    """Cluster ``weight`` into ``2**bits`` shared values per group of channels.

    ``group_size`` adjacent output channels along ``axis`` share one codebook row;
    ``None`` means one codebook for the whole tensor.  ``method="binary"`` is the
    1-bit scheme ``sign(W) * s_g`` with ``s_g = mean |W|`` over the group (the L2
    optimal scale for a sign code).  ``importance`` (same shape as ``weight``,
    non-negative) weights the k-means error of each weight, e.g. by the mean
    squared input activation it multiplies (activation-aware clustering).
    """
    if not 1 <= int(bits) <= 8:
        raise ConfigError(f"bits must be in 1..8, got {bits}")
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    weight = np.asarray(weight, dtype=np.float32)
    if weight.ndim == 0:
        weight = weight.reshape(1)
    axis = axis % weight.ndim
    channels = weight.shape[axis]
    group_size = channels if group_size is None else max(1, min(int(group_size), channels))
    k = 1 << int(bits)
    moved = np.moveaxis(weight, axis, 0)
    imp = None if importance is None else np.moveaxis(np.asarray(importance, dtype=np.float64), axis, 0)
    indices = np.empty(moved.shape, dtype=np.uint8)
    rows: list[np.ndarray] = []
    full = channels // group_size
    if method == "kmeans" and full > 1:
        # Many codebooks: one vectorised call for all full groups, then the remainder.
        n_full = full * group_size
        block = moved[:n_full].reshape(full, -1)
        wts = None if imp is None else imp[:n_full].reshape(full, -1)
        cents, labels = kmeans_rows(block, k, init=init, weights=wts, seed=seed)
        rows.extend(cents)
        indices[:n_full] = labels.reshape(moved[:n_full].shape)
        if n_full < channels:
            rest = moved[n_full:]
            c, l = kmeans_1d(rest, k, init=init, weights=None if imp is None else imp[n_full:], seed=seed + full)
            rows.append(c)
            indices[n_full:] = l.reshape(rest.shape)
        groups_iter = []
    else:
        groups_iter = list(_groups(weight, axis, group_size))
    for g, sl in groups_iter:
        block = moved[sl]
        if method == "binary":
            scale = float(np.mean(np.abs(block))) if block.size else 0.0
            rows.append(np.array([-scale, scale]))
            indices[sl] = block >= 0
            continue
        cents, labels = kmeans_1d(
            block, k, init=init, weights=None if imp is None else imp[sl], seed=seed + g
        )
        rows.append(cents)
        indices[sl] = labels.reshape(block.shape)
    width = max(r.size for r in rows)
    # Rows with fewer distinct values are padded with their last entry (never indexed).
    codebook = np.stack([np.pad(r, (0, width - r.size), mode="edge") for r in rows]).astype(np.float32)
    return Clustering(codebook, np.moveaxis(indices, 0, axis), axis, group_size)
