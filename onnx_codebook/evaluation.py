"""Running a model in onnxruntime on data, and the metrics of the result."""

from __future__ import annotations

from typing import Callable

import numpy as np


from . import ops
from .data import Dataset, ImageOptions, batches, load_data
from .errors import CodebookError, DataError
from .io import load_model


def fixed_batch(session) -> int | None:
    """The batch size the model's first input insists on, if any."""
    dim = session.get_inputs()[0].shape[0] if session.get_inputs()[0].shape else None
    return dim if isinstance(dim, int) and dim > 0 else None


def predict(session, data: Dataset, *, batch_size: int = 64, progress: Callable[[int], None] | None = None) -> np.ndarray:
    """The first output of ``session`` over all samples, as float64 ``[N, ...]``."""
    bs = fixed_batch(session) or batch_size
    name = session.get_outputs()[0].name
    outs = []
    n = len(data)
    for sl in batches(n, bs):
        feed = {k: v[sl] for k, v in data.inputs.items()}
        if fixed_batch(session) and sl.stop - sl.start < bs:
            pad = bs - (sl.stop - sl.start)
            feed = {k: np.concatenate([v, np.repeat(v[-1:], pad, axis=0)]) for k, v in feed.items()}
        try:
            y = session.run([name], feed)[0]
        except Exception as e:  # onnxruntime raises its own exception types
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"the model cannot run on this data: {msg[:300]}") from e
        outs.append(np.asarray(y, dtype=np.float64)[: sl.stop - sl.start])
        if progress:
            progress(sl.stop - sl.start)
    out = np.concatenate(outs)
    if out.ndim > 2 and all(d == 1 for d in out.shape[2:]):
        out = out.reshape(out.shape[0], -1)
    return out


def sqnr_db(reference: np.ndarray, output: np.ndarray) -> float:
    err = float(np.sum((reference - output) ** 2))
    sig = float(np.sum(reference**2))
    if err == 0:
        return float("inf")
    return float(10 * np.log10(sig / err)) if sig > 0 else float("-inf")


def check_labels(labels: np.ndarray, logits: np.ndarray) -> None:
    if logits.ndim != 2:
        raise DataError(f"labels need a [N, classes] output; the model's first output has shape {list(logits.shape)}")
    if labels.max() >= logits.shape[1]:
        raise DataError(f"label {int(labels.max())} is out of range for a model with {logits.shape[1]} classes")


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float | None:
    if logits.shape[1] < k:
        return None
    if k == 1:
        return float(np.mean(np.argmax(logits, axis=1) == labels) * 100)
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return float(np.mean(np.any(top == labels[:, None], axis=1)) * 100)


def metrics(logits: np.ndarray, labels: np.ndarray | None = None, reference: np.ndarray | None = None) -> dict:
    """top1 / top5 (%, with labels), agreement (% same top-1 as the reference) and SQNR (dB)."""
    out: dict = {"samples": int(len(logits))}
    if labels is not None:
        check_labels(labels, logits)
        out["top1"] = topk_accuracy(logits, labels, 1)
        out["top5"] = topk_accuracy(logits, labels, 5)
    if reference is not None:
        if reference.shape != logits.shape:
            raise DataError(f"reference output shape {list(reference.shape)} differs from {list(logits.shape)}")
        if logits.ndim == 2:
            out["agreement"] = float(np.mean(np.argmax(logits, 1) == np.argmax(reference, 1)) * 100)
        out["sqnr_db"] = sqnr_db(reference, logits)
    return out


def evaluate(
    model,
    data,
    reference=None,
    *,
    image: ImageOptions | None = None,
    batch_size: int = 64,
    threads: int | None = None,
    limit: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Evaluate ``model`` (path or ModelProto) on ``data``; with ``reference`` (the
    original model) also top-1 agreement and output SQNR.  Returns a dict of metrics."""
    m = load_model(model)
    ds = load_data(data, m, image)
    if limit:
        ds = ds.subset(np.arange(min(limit, len(ds))))
    # onnxruntime's own warnings (printed straight to stderr as it loads a model) stay
    # out of the report; its errors still raise
    logits = predict(ops.session(m, threads=threads, quiet=True), ds, batch_size=batch_size, progress=progress)
    ref_logits = None
    if reference is not None:
        r = load_model(reference)
        if [i.name for i in r.graph.input if i.name in ds.inputs] != [i.name for i in m.graph.input if i.name in ds.inputs]:
            raise CodebookError("the reference model's inputs differ from the model's")
        ref_logits = predict(ops.session(r, threads=threads, quiet=True), ds, batch_size=batch_size)
    return metrics(logits, ds.labels, ref_logits)


__all__ = ["evaluate", "metrics", "predict"]
