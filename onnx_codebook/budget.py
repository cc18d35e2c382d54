"""Accuracy-budget search: per-layer codebook settings chosen by an evaluator loop.

1. **Profile** — each layer alone at each candidate setting, scored by a cheap
   proxy on a subset: the relative energy of the logit error,
   ``||f_q(x) - f(x)||^2 / ||f(x)||^2``.  Large spaces are profiled at two anchor
   settings per layer and the rest predicted from the weight error (a power law
   fitted per layer), which keeps the profile at O(layers) runs.
2. **Allocate** — a Lagrangian relaxation of the multiple-choice knapsack:
   for a multiplier ``lam`` each layer independently takes the setting that
   minimises ``bytes + lam * noise``; sweeping ``lam`` gives a path of
   allocations from least to most compressed (each Pareto-optimal for the
   additive noise model).
3. **Verify** — the real metric of combined models: a bisection along the path
   for the smallest allocation within the budget, then greedy pushes (a layer
   one step cheaper, best bytes saved per predicted noise first) kept only while
   the measured metric stays within budget; uniform settings predicted cheaper
   are tried too, so the result is never larger than a uniform setting the
   search saw meet the budget.

Candidates are evaluated without re-serialising the model: one onnxruntime
session takes the searched weights (and the biases bias correction edits) as
inputs.  Evaluations go through an :class:`Executor` (in-process, or a process
pool with ``workers > 1``).
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Protocol, Sequence

import multiprocessing
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from .config import CompressConfig, LayerSettings
from .data import Dataset
from .encode import CODEBOOK_ITEMSIZE, footprint
from .errors import ConfigError, DataError
from .evaluation import check_labels, predict
from .pipeline import ClusterCache, LayerPlan, compress_model, layer_clustering, plan_layer
from .schema import GRANULARITIES
from .select import (Layer, constants_to_initializers, fold_batch_norms, fold_weight_casts, quantized_note,
                     select_layers, skip_reasons, unlist_ir3_weight_inputs, weight_casts_note)

log = logging.getLogger(__name__)

FLOAT = "float"  # the "leave it alone" choice


@dataclass(frozen=True)
class Choice:
    """One candidate setting of one layer."""

    bits: int
    granularity: str
    group_size: int = 8

    def settings(self) -> LayerSettings:
        return LayerSettings(bits=self.bits, granularity=self.granularity, group_size=self.group_size)

    def label(self) -> str:
        return self.settings().describe()


@dataclass
class Option:
    """A choice as it applies to one layer: its bytes, weight error and predicted noise."""

    choice: Choice | None  # None = keep float
    bytes: int
    weight_error: float  # relative squared error of the weight
    noise: float = 0.0  # predicted relative logit-error energy
    measured: bool = False
    plan: LayerPlan | None = None


@dataclass
class LayerState:
    layer: Layer
    options: list[Option]
    bias: str | None = None  # bias tensor name fed as input (bias correction)
    bias_node: onnx.NodeProto | None = None
    input_name: str = ""


class Executor(Protocol):
    """Runs candidate evaluations; a distributed backend implements the same."""

    def map(self, assignments: Sequence[dict], subset: str) -> list[np.ndarray]: ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------- runner


class CandidateRunner:
    """One onnxruntime session in which the searched weights (and biases) are inputs.

    ``run(assignment, subset)`` decodes the weights an assignment names
    (``{weight: (plan, importance_flag)}``), feeds them with the data and
    returns the logits.  Clusterings are cached per (layer, bits, group size).
    """

    def __init__(self, model: onnx.ModelProto, layers: dict[str, np.ndarray], biases: dict[str, np.ndarray],
                 subsets: dict[str, Dataset], *, seed: int, importance: dict[str, np.ndarray] | None,
                 threads: int | None = None):
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
        feed_names = set(layers) | set(biases)
        keep = [t for t in proto.graph.initializer if t.name not in feed_names]
        values = {**layers, **biases}
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(keep)
        for name, arr in values.items():
            proto.graph.input.append(onnx.helper.make_tensor_value_info(
                name, onnx.helper.np_dtype_to_tensor_dtype(arr.dtype), list(arr.shape)))
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        so.log_severity_level = 3
        self.session = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
        self.weights = layers
        self.biases = biases
        self.subsets = subsets
        self.seed = seed
        self.importance = importance or {}
        self.cache: ClusterCache = {}

    def decoded(self, name: str, plan: LayerPlan, aware: bool) -> np.ndarray:
        imp = self.importance.get(name) if aware else None
        c = layer_clustering(name, self.weights[name], plan, self.seed, self.cache, imp)
        return c.decode().astype(self.weights[name].dtype, copy=False)

    def run(self, assignment: dict, subset: str) -> np.ndarray:
        feeds = dict(self.weights)
        feeds.update(self.biases)
        for name, (plan, aware, bias) in assignment.items():
            if plan is not None:
                feeds[name] = self.decoded(name, plan, aware)
            if bias is not None:
                feeds[bias[0]] = bias[1]
        return predict_with_constants(self.session, self.subsets[subset], feeds)


def predict_with_constants(session, data: Dataset, constants: dict) -> np.ndarray:
    """Like :func:`predict`, feeding ``constants`` unchanged with every batch."""

    class _Wrapped:
        def __init__(self, s):
            self._s = s

        def get_inputs(self):
            return [i for i in self._s.get_inputs() if i.name not in constants]

        def get_outputs(self):
            return self._s.get_outputs()

        def run(self, names, feed):
            return self._s.run(names, {**feed, **constants})

    return predict(_Wrapped(session), data)


_WORKER: CandidateRunner | None = None


def _worker_init(args) -> None:
    global _WORKER
    model_bytes, layers, biases, subsets, seed, importance, threads = args
    model = onnx.ModelProto()
    model.ParseFromString(model_bytes)
    _WORKER = CandidateRunner(model, layers, biases, subsets, seed=seed, importance=importance, threads=threads)


def _worker_run(task):
    assignment, subset = task
    return _WORKER.run(assignment, subset)


class InProcessExecutor:
    def __init__(self, runner: CandidateRunner):
        self.runner = runner

    def map(self, assignments, subset):
        return [self.runner.run(a, subset) for a in assignments]

    def close(self):
        pass


class ProcessPoolExecutorBackend:
    """Evaluations spread over worker processes, each with its own session and cache."""

    def __init__(self, workers: int, init_args: tuple):
        ctx = multiprocessing.get_context("spawn")
        self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                                        initargs=(init_args,))

    def map(self, assignments, subset):
        return list(self.pool.map(_worker_run, [(a, subset) for a in assignments]))

    def close(self):
        self.pool.shutdown(cancel_futures=True)


# --------------------------------------------------------------------------- helpers


def relative_noise(reference: np.ndarray, output: np.ndarray) -> float:
    return float(np.sum((output - reference) ** 2) / max(np.sum(reference**2), 1e-30))


def score(logits: np.ndarray, labels: np.ndarray | None, reference: np.ndarray, metric: str) -> float:
    """The metric in percent: top-1 accuracy, or top-1 agreement with the original."""
    if metric == "top1":
        return float(np.mean(np.argmax(logits, 1) == labels) * 100)
    return float(np.mean(np.argmax(logits, 1) == np.argmax(reference, 1)) * 100)


def pareto_front(points: Iterable[tuple[int, float]]) -> list[tuple[int, float]]:
    """Points not beaten by one both smaller and at least as good, sorted by bytes."""
    front, best = [], -math.inf
    for b, m in sorted(points, key=lambda p: (p[0], -p[1])):
        if m > best:
            front.append((b, m))
            best = m
    return front


def activation_stats(model: onnx.ModelProto, data: Dataset, names: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-channel mean and mean square of the named tensors (channel = axis 1 for
    rank-4 NCHW tensors, else the last axis)."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model)
    existing = {o.name for o in proto.graph.output}
    for n in names:
        if n not in existing:
            proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    sums: dict[str, list] = {}
    bs = 32
    n = len(data)
    for start in range(0, n, bs):
        feed = {k: v[start:start + bs] for k, v in data.inputs.items()}
        outs = sess.run(names, feed)
        for name, y in zip(names, outs):
            y = np.asarray(y, dtype=np.float64)
            if y.ndim >= 3:
                axes = (0,) + tuple(range(2, y.ndim))
                m, m2, cnt = y.sum(axis=axes), (y * y).sum(axis=axes), y.size // y.shape[1]
            else:
                y2 = y.reshape(-1, y.shape[-1])
                m, m2, cnt = y2.sum(0), (y2 * y2).sum(0), y2.shape[0]
            acc = sums.setdefault(name, [0.0, 0.0, 0])
            acc[0] = acc[0] + m
            acc[1] = acc[1] + m2
            acc[2] += cnt
    return {k: (v[0] / v[2], v[1] / v[2]) for k, v in sums.items()}


def _input_channel_of(layer: Layer, node: gs.Node) -> tuple[np.ndarray, int]:
    """For each weight element, the index of the input channel it multiplies (an
    index array broadcastable to the weight) and the input-channel axis of the weight."""
    shape = layer.shape
    if layer.op_type == "Conv":
        group = int(node.attrs.get("group", 1))
        per = shape[1]
        out_per_group = shape[0] // group
        oc = np.arange(shape[0]) // out_per_group
        idx = oc[:, None] * per + np.arange(per)[None, :]
        return idx.reshape(shape[0], per, *([1] * (len(shape) - 2))), 1
    if layer.op_type == "Gemm":
        if int(node.attrs.get("transB", 0)):
            return np.arange(shape[1])[None, :], 1
        return np.arange(shape[0])[:, None], 0
    if layer.op_type == "MatMul":
        idx = np.arange(shape[-2]).reshape((shape[-2], 1))
        return idx, len(shape) - 2
    raise ValueError(layer.op_type)


# --------------------------------------------------------------------------- search


@dataclass
class SearchResult:
    model: onnx.ModelProto
    report: dict
    warnings: list[str] = field(default_factory=list)


def default_choices(bits: Sequence[int], granularities: Sequence[str], group_size: int) -> list[Choice]:
    choices = []
    for g in granularities:
        if g not in GRANULARITIES:
            raise ConfigError(f"granularity must be among {', '.join(GRANULARITIES)}, got {g!r}")
        for b in bits:
            LayerSettings(bits=int(b), granularity=g, group_size=group_size)  # validates
            choices.append(Choice(int(b), g, group_size))
    if not choices:
        raise ConfigError("no candidate settings: give at least one bit-width and granularity")
    return choices


def run_search(
    model: onnx.ModelProto,
    data: Dataset | None,
    *,
    evaluator: Callable[[ort.InferenceSession], float] | None = None,
    max_drop: float = 1.0,
    drop_type: str = "absolute",
    metric: str = "top1",
    bits: Sequence[int] = (2, 3, 4, 5, 6, 8),
    granularities: Sequence[str] = ("tensor", "channel"),
    group_size: int = 8,
    holdout_fraction: float = 0.2,
    time_budget: float | None = None,
    workers: int = 1,
    threads: int | None = None,
    config: CompressConfig | None = None,
    bias_correction: bool = False,
    activation_aware: bool = False,
    profile_samples: int = 64,
    max_evaluations: int = 40,
    min_gain: float = 0.005,
    full_profile_limit: int = 240,
    seed: int = 0,
    progress: Callable[[str, float], None] | None = None,
) -> SearchResult:
    """Find per-layer settings that minimise stored bytes with the metric within budget.

    ``data`` is a :class:`Dataset` already fitted to the model; ``evaluator``, if
    given, scores an onnxruntime session (higher is better) and replaces the
    built-in metric for verification (the profile still uses ``data``'s logits).
    """
    t0 = time.perf_counter()
    notes: list[str] = []
    if drop_type not in ("absolute", "relative"):
        raise ConfigError(f"drop type must be absolute or relative, got {drop_type!r}")
    if metric not in ("top1", "agreement"):
        raise ConfigError(f"metric must be top1 or agreement, got {metric!r}")
    if not (isinstance(max_drop, (int, float)) and max_drop >= 0 and math.isfinite(max_drop)):
        raise ConfigError(f"max drop must be a non-negative number, got {max_drop!r}")
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    if data is None and evaluator is None:
        raise DataError("the search needs data or an evaluator")
    if data is not None and len(data) < 2:
        raise DataError(f"the search needs at least 2 samples, got {len(data)}")
    if data is not None and metric == "top1" and data.labels is None and evaluator is None:
        raise DataError("--metric top1 needs labels in the data; use --metric agreement for unlabelled data")
    config = config or CompressConfig()
    choices = default_choices(bits, granularities, group_size)
    # Normalisations folded (an IR 3 model's weights unlisted from its inputs, Constant-node
    # weights and parameters made initializers, and float16 weights read through a Cast
    # made float32, first) once, up front: every model the search builds and scores then
    # has the weights compress_model will cluster.
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    changed = unlist_ir3_weight_inputs(folded, any_version=config.weight_inputs)
    changed += constants_to_initializers(folded, config.ops)
    cast = fold_weight_casts(folded, config.ops)  # before the normalisations: it makes such weights foldable
    if changed + len(cast) + fold_batch_norms(folded):
        model = folded

    def tick(msg: str, frac: float) -> None:
        if progress:
            progress(msg, frac)
        log.info("%s", msg)

    # ---- data split
    if data is None:
        search_set = holdout = profile_set = None
        bias_correction = activation_aware = False  # both need calibration data
    else:
        search_set, holdout = data.split(holdout_fraction, seed) if holdout_fraction > 0 else (data, None)
        rng = np.random.default_rng(seed)
        prof_idx = np.sort(rng.permutation(len(search_set))[: min(profile_samples, len(search_set))])
        profile_set = search_set.subset(prof_idx)
    subsets = {"profile": profile_set, "search": search_set}

    # ---- layers
    proto = onnx.ModelProto()
    proto.CopyFrom(model)  # (its Constant-node weights were made initializers up front)
    graph = gs.import_onnx(proto)
    layers, skipped = select_layers(graph, config.ops, config.min_elements, {i.name for i in proto.graph.input}, cast)
    layers = [l for l in layers if l.graph is graph and l.weight not in config.exclude]
    if not layers:
        raise ConfigError(f"no eligible layer to search over{skip_reasons(skipped)}"
                          + (quantized_note(proto) or "; try a lower --min-elements"))
    weights = {l.weight: np.asarray(l.constant.values) for l in layers}

    # ---- calibration statistics (bias correction, activation-aware clustering)
    states: list[LayerState] = []
    biases: dict[str, np.ndarray] = {}
    importance: dict[str, np.ndarray] = {}
    corrections: dict[str, tuple] = {}
    stats = {}
    if bias_correction or activation_aware:
        inputs_needed = sorted({l.consumers[0].inputs[0].name for l in layers})
        stats = activation_stats(proto, profile_set, inputs_needed)
    init_names = {t.name for t in proto.graph.initializer}
    for l in layers:
        st = LayerState(l, [], input_name=l.consumers[0].inputs[0].name)
        node = l.consumers[0]
        if activation_aware and l.op_type != "ConvTranspose" and st.input_name in stats:
            idx, _ = _input_channel_of(l, node)
            msq = stats[st.input_name][1]
            if idx.max() < msq.size:
                importance[l.weight] = np.broadcast_to(msq[idx], l.shape).astype(np.float64)
        if bias_correction and len(l.consumers) == 1 and l.op_type in ("Conv", "Gemm") and st.input_name in stats:
            bias_t = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
            if bias_t is None or (isinstance(bias_t, gs.Constant) and bias_t.name in init_names):
                out_ch = l.shape[0] if l.op_type == "Conv" else l.shape[l.axis]
                if bias_t is None:
                    name = f"{l.weight}.bias_correction"
                    bvals = np.zeros(out_ch, dtype=weights[l.weight].dtype)
                    if len(node.inputs) == 2:
                        node.inputs.append(gs.Constant(name, bvals))
                        st.bias = name
                        biases[name] = bvals
                else:
                    bvals = np.asarray(bias_t.values)
                    if bvals.shape in ((out_ch,), (1, out_ch)):
                        st.bias = bias_t.name
                        biases[bias_t.name] = bvals
        states.append(st)
    if biases and any(b.endswith(".bias_correction") for b in biases):
        proto = gs.export_onnx(graph, do_type_check=False)
        proto.ir_version = model.ir_version
        del proto.opset_import[:]
        proto.opset_import.extend(model.opset_import)
    tick(f"{len(layers)} layers, {len(choices)} candidate settings each", 0.02)

    cache: ClusterCache = {}
    # ---- runner / executor
    runner_args = (proto.SerializeToString(), weights, biases, subsets, seed, importance, threads)
    if data is None:
        executor = None
    elif workers > 1:
        per = max(1, (threads or 2) // workers)
        executor: Executor = ProcessPoolExecutorBackend(workers, runner_args[:-1] + (per,))
    else:
        runner = CandidateRunner(proto, weights, biases, subsets, seed=seed, importance=importance, threads=threads)
        runner.cache = cache
        executor = InProcessExecutor(runner)

    # ---- baseline
    if executor is not None:
        ref_profile, ref_search = executor.map([{}], "profile")[0], executor.map([{}], "search")[0]
        labels = search_set.labels
        if ref_search.ndim != 2:
            raise DataError(f"the search needs a [N, classes] output; the model's first output has shape "
                            f"{list(ref_search.shape)}")
        if labels is not None and evaluator is None:
            check_labels(labels, ref_search)

    def measure(logits_list: list[np.ndarray]) -> list[float]:
        return [score(l, labels, ref_search, metric) for l in logits_list]

    baseline = score(ref_search, labels, ref_search, metric) if executor is not None else 0.0
    target = baseline - max_drop if drop_type == "absolute" else baseline * (1 - max_drop / 100)
    tick(f"baseline {metric} {baseline:.2f}; target >= {target:.2f}", 0.12)

    # ---- options per layer (bytes, weight error)
    fmt_cfg = config
    total_fp32 = sum(l.size * 4 for l in layers)
    for st in states:
        l = st.layer
        st.options.append(Option(None, l.nbytes, 0.0))
        seen = set()
        for ch in choices:
            plan = plan_layer(l, fmt_cfg, 2, ch.settings())
            if not plan.group_size:
                continue
            key = (plan.settings.bits, plan.group_size)
            if key in seen:
                continue
            seen.add(key)
            fp = footprint(l.size, plan.channels, plan.settings.bits, plan.group_size, 1 << plan.settings.bits,
                           fmt=plan.fmt, codebook_itemsize=CODEBOOK_ITEMSIZE[config.codebook_dtype],
                           container=None if plan.fmt == "fused" else plan.container)
            c = layer_clustering(l.weight, weights[l.weight], plan, seed, cache, importance.get(l.weight))
            w = weights[l.weight].astype(np.float64)
            err = float(np.sum((c.decode() - w) ** 2) / max(np.sum(w * w), 1e-30))
            st.options.append(Option(ch, fp.total, err, plan=plan))
    tick("clustered every candidate", 0.1)

    def bias_for(st: LayerState, opt: Option):
        if st.bias is None or opt.choice is None:
            return None
        mean_x = stats[st.input_name][0]
        c = layer_clustering(st.layer.weight, weights[st.layer.weight], opt.plan, seed, cache,
                             importance.get(st.layer.weight))
        delta_w = c.decode().astype(np.float64) - weights[st.layer.weight]
        idx, in_axis = _input_channel_of(st.layer, st.layer.consumers[0])
        contrib = delta_w * mean_x[np.broadcast_to(idx, st.layer.shape)]
        out_axis = 0 if st.layer.op_type == "Conv" else st.layer.axis
        err = np.moveaxis(contrib, out_axis, 0).reshape(st.layer.shape[out_axis], -1).sum(1)
        if st.layer.op_type == "Gemm":
            attrs = st.layer.consumers[0].attrs
            err = err * float(attrs.get("alpha", 1.0)) / max(float(attrs.get("beta", 1.0)), 1e-30)
        base = biases[st.bias]
        return (st.bias, (base - err.reshape(base.shape)).astype(base.dtype))

    def assignment_of(alloc: Sequence[int]) -> dict:
        out = {}
        for st, i in zip(states, alloc):
            opt = st.options[i]
            if opt.choice is None:
                continue
            out[st.layer.weight] = (opt.plan, bool(importance.get(st.layer.weight) is not None), bias_for(st, opt))
        return out

    # ---- sensitivity profile
    n_runs_full = sum(len(st.options) - 1 for st in states)
    full = n_runs_full <= full_profile_limit
    jobs: list[tuple[int, int]] = []
    if executor is None:
        # No data: predicted noise is the weight error alone (every layer equally sensitive).
        full = True
        for st in states:
            for o in st.options[1:]:
                o.noise = o.weight_error
        states_to_profile = []
    else:
        states_to_profile = states
    for li, st in enumerate(states_to_profile):
        opts = list(range(1, len(st.options)))
        if not full and len(opts) > 2:
            # Two anchors: the least and a middle error option.
            by_err = sorted(opts, key=lambda i: st.options[i].weight_error)
            opts = [by_err[len(by_err) // 3], by_err[-1]]
        jobs.extend((li, oi) for oi in opts)
    evaluations = profile_runs = 0
    batch = max(1, workers) * 4
    for start in range(0, len(jobs), batch):
        chunk = jobs[start:start + batch]
        outs = executor.map([{states[li].layer.weight: (states[li].options[oi].plan,
                                                         importance.get(states[li].layer.weight) is not None,
                                                         bias_for(states[li], states[li].options[oi]))}
                             for li, oi in chunk], "profile")
        for (li, oi), y in zip(chunk, outs):
            opt = states[li].options[oi]
            opt.noise = relative_noise(ref_profile, y)
            opt.measured = True
        profile_runs += len(chunk)
        tick(f"profile {min(start + batch, len(jobs))}/{len(jobs)}", 0.12 + 0.4 * min(start + batch, len(jobs)) / len(jobs))
    if not full:
        for st in states:
            meas = [o for o in st.options[1:] if o.measured]
            pts = [(math.log(max(o.weight_error, 1e-30)), math.log(max(o.noise, 1e-30))) for o in meas]
            beta = 1.0
            if len(pts) == 2 and abs(pts[1][0] - pts[0][0]) > 1e-6:
                beta = min(2.0, max(0.5, (pts[1][1] - pts[0][1]) / (pts[1][0] - pts[0][0])))
            ref = max(meas, key=lambda o: o.weight_error)
            for o in st.options[1:]:
                if not o.measured:
                    o.noise = ref.noise * (max(o.weight_error, 1e-30) / max(ref.weight_error, 1e-30)) ** beta
    # Noise never decreases with fewer bytes within a layer's options (monotone fix).
    for st in states:
        for o in st.options[1:]:
            o.noise = max(o.noise, 1e-12 * o.weight_error)

    # ---- allocation path
    def allocate(lam: float) -> tuple[int, ...]:
        return tuple(int(np.argmin([o.bytes + lam * o.noise for o in st.options])) for st in states)

    def alloc_bytes(a) -> int:
        return sum(st.options[i].bytes for st, i in zip(states, a))

    def alloc_noise(a) -> float:
        return sum(st.options[i].noise for st, i in zip(states, a))

    path = {}
    for lam in np.logspace(-2, 16, 400) * total_fp32:
        a = allocate(lam)
        path.setdefault(a, None)
    most = tuple(int(np.argmin([o.bytes for o in st.options])) for st in states)
    path.setdefault(most, None)
    candidates = sorted(path, key=alloc_bytes)  # most compressed first
    candidates = [a for a in candidates if any(i != 0 for i in a)]

    # ---- verification
    evaluated: dict[tuple, float] = {}
    points: list[dict] = []

    def evaluate_allocs(allocs: list[tuple]) -> list[float]:
        nonlocal evaluations
        todo = [a for a in allocs if a not in evaluated]
        if todo:
            if evaluator is not None:
                scores = [_user_score(evaluator, model, config, states, a, cache, importance, seed) for a in todo]
            else:
                scores = measure(executor.map([assignment_of(a) for a in todo], "search"))
            evaluations += len(todo)
            for a, s in zip(todo, scores):
                evaluated[a] = s
                points.append({"bytes": alloc_bytes(a), "metric": s, "predicted_noise": alloc_noise(a),
                               "settings": {st.layer.weight: (st.options[i].choice.label() if st.options[i].choice else FLOAT)
                                            for st, i in zip(states, a)}})
        return [evaluated[a] for a in allocs]

    def over_time() -> bool:
        return time_budget is not None and time.perf_counter() - t0 > time_budget

    if evaluator is not None:
        baseline = float(evaluator(_session_for(model)))
        target = baseline - max_drop if drop_type == "absolute" else baseline * (1 - max_drop / 100)

    best: tuple | None = None
    lo, hi = 0, len(candidates) - 1  # find smallest index (fewest bytes) that is feasible
    if candidates:
        # Feasible region is assumed to be a suffix [k, end) of the path (less compression).
        if evaluate_allocs([candidates[hi]])[0] >= target:
            best = candidates[hi]
            lo_bad = -1
            hi_ok = hi
            while hi_ok - lo_bad > 1 and evaluations < max_evaluations and not over_time():
                k = max(1, workers)
                probes = sorted({lo_bad + (hi_ok - lo_bad) * (j + 1) // (k + 1) for j in range(k)} - {lo_bad, hi_ok})
                if not probes:
                    break
                res = evaluate_allocs([candidates[p] for p in probes])
                for p, r in zip(probes, res):
                    if r >= target:
                        hi_ok = min(hi_ok, p)
                    else:
                        lo_bad = max(lo_bad, p) if p < hi_ok else lo_bad
                best = candidates[hi_ok]
                tick(f"verify: {alloc_bytes(best) / 1024:.1f} KB meets the budget", 0.6 + 0.2 * evaluations / max_evaluations)
    if best is None:
        # Least compression the search considers: every layer at its best-quality option.
        safest = tuple(min(range(1, len(st.options)), key=lambda i: st.options[i].noise, default=0) for st in states)
        if evaluate_allocs([safest])[0] >= target:
            best = safest
        else:
            best = safest
            notes.append(f"no setting meets the budget ({metric} >= {target:.2f} on the search data); returning the "
                         f"least-compressed candidate ({evaluated[safest]:.2f})")

    # ---- uniform settings predicted smaller than the best: the search must not lose to them
    for ch in choices:
        if over_time() or evaluations >= max_evaluations:
            break
        a = tuple(next((i for i, o in enumerate(st.options) if o.choice == ch), 0) for st in states)
        if any(i == 0 for i in a) or a in evaluated:
            continue
        if alloc_bytes(a) < alloc_bytes(best) and alloc_noise(a) <= 4 * max(alloc_noise(best), 1e-30):
            if evaluate_allocs([a])[0] >= target:
                best = a

    # ---- greedy push: one layer one step cheaper at a time, best saving per noise first
    if best in evaluated and evaluated[best] >= target:
        failed: set[tuple] = set()
        while evaluations < max_evaluations and not over_time():
            moves = []
            for li, st in enumerate(states):
                cur = st.options[best[li]]
                for oi, o in enumerate(st.options):
                    # Moves that save less than min_gain of the total are not worth an evaluation.
                    if cur.bytes - o.bytes >= min_gain * alloc_bytes(best) and (li, oi) not in failed:
                        dn = max(o.noise - cur.noise, 1e-30)
                        moves.append(((cur.bytes - o.bytes) / dn, li, oi))
            if not moves:
                break
            moves.sort(reverse=True)
            k = max(1, workers)
            tries = []
            for _, li, oi in moves[:k]:
                a = list(best)
                a[li] = oi
                tries.append((tuple(a), li, oi))
            res = evaluate_allocs([t[0] for t in tries])
            # Keep the smallest feasible try; infeasible moves are not tried again.
            for (a, li, oi), r in sorted(zip(tries, res), key=lambda x: alloc_bytes(x[0][0])):
                if r < target:
                    failed.add((li, oi))
                elif alloc_bytes(a) < alloc_bytes(best) and best is not a:
                    best = a
        tick("push done", 0.85)
    if executor is not None:
        executor.close()

    # ---- final model
    result = compress_model(model, _config_for(config, states, best, seed), cache=cache,
                            importance=importance or None)
    final = result.model
    bias_updates = {}
    for st, i in zip(states, best):
        b = bias_for(st, st.options[i])
        if b is not None:
            bias_updates[st.layer.consumers[0].name] = b
    if bias_updates:
        final = apply_bias_updates(final, bias_updates)
    notes.extend(result.warnings)
    tick("final model built", 0.9)

    # ---- re-measure the final model independently (a fresh session)
    def final_scores(ds: Dataset) -> tuple[float, float]:
        sess_c = _session_for(final, threads)
        sess_o = _session_for(model, threads)
        if evaluator is not None:
            return float(evaluator(sess_o)), float(evaluator(sess_c))
        ref = predict(sess_o, ds)
        return score(ref, ds.labels, ref, metric), score(predict(sess_c, ds), ds.labels, ref, metric)

    base_s, comp_s = final_scores(search_set) if search_set is not None or evaluator else (0.0, 0.0)
    hold = None
    if holdout is not None and evaluator is None:
        hb, hc = final_scores(holdout)
        hold = {"baseline": hb, "compressed": hc, "drop": hb - hc, "samples": len(holdout)}
    wall = time.perf_counter() - t0
    layers_report = []
    for st, i in zip(states, best):
        opt = st.options[i]
        measured = [o for o in st.options[1:] if o.measured]
        layers_report.append({
            "name": st.layer.weight, "op": st.layer.op_type, "shape": list(st.layer.shape),
            "bits": opt.choice.bits if opt.choice else 32,
            "granularity": (opt.plan.settings.granularity if opt.plan else FLOAT),
            "group_size": opt.plan.group_size if opt.plan else None,
            "codebook_entries": (math.ceil(opt.plan.channels / opt.plan.group_size) * (1 << opt.plan.settings.bits)
                                 if opt.plan else 0),
            "bytes_fp32": st.layer.size * 4, "bytes_original": st.layer.nbytes, "bytes_stored": opt.bytes,
            "sensitivity": {o.choice.label(): o.noise for o in measured},
            "predicted_noise": opt.noise,
            "bias_corrected": st.layer.consumers[0].name in bias_updates,
        })
    bytes_before = sum(r["bytes_original"] for r in layers_report)
    bytes_after = sum(r["bytes_stored"] for r in layers_report)
    drop_search = base_s - comp_s
    limit = max_drop if drop_type == "absolute" else base_s * max_drop / 100
    if drop_search > limit + 1e-9 and not notes:
        notes.append(f"the final model drops {drop_search:.2f} points on the search data, over the budget")
    if cast:
        notes.append(weight_casts_note(len(cast)))
    report = {
        "metric": metric, "max_drop": max_drop, "drop_type": drop_type, "target": target,
        "search": {"baseline": base_s, "compressed": comp_s, "drop": drop_search,
                   "samples": len(search_set) if search_set is not None else None},
        "holdout": hold,
        "weight_bytes_before": bytes_before, "weight_bytes_after": bytes_after,
        "compression_ratio": bytes_before / max(bytes_after, 1),
        "evaluations": evaluations, "profile_runs": profile_runs,
        "profile": "weight-error only (no data)" if executor is None else ("full" if full else "anchors"),
        "wall_time_s": wall, "bias_correction": bias_correction, "activation_aware": activation_aware,
        "layers": layers_report,
        "points": points,
        "pareto": [{"bytes": b, "metric": m} for b, m in pareto_front((p["bytes"], p["metric"]) for p in points)],
        "skipped": [{"name": s.name, "op": s.op_type, "reason": s.reason} for s in skipped],
        "warnings": notes,
    }
    return SearchResult(final, report, notes)


def _session_for(model: onnx.ModelProto, threads: int | None = None):
    from . import ops

    return ops.session(model, threads=threads, quiet=True)  # one per candidate: no repeated warnings


def _config_for(config: CompressConfig, states: list[LayerState], alloc: Sequence[int], seed: int) -> CompressConfig:
    """The compress configuration of an allocation: per-weight overrides, float layers excluded."""
    overrides, exclude = {}, set(config.exclude)
    for st, i in zip(states, alloc):
        opt = st.options[i]
        if opt.choice is None:
            exclude.add(st.layer.weight)
        else:
            overrides[st.layer.weight] = opt.choice.settings()
    return replace(config, overrides=overrides, seed=seed, exclude=frozenset(exclude))


def _user_score(evaluator, model, config, states, alloc, cache, importance, seed) -> float:
    """Score an allocation with a user evaluator: build the real model, open a session."""
    cfg = _config_for(config, states, alloc, seed)
    m = compress_model(model, cfg, cache=cache, importance=importance or None, validate=False).model
    return float(evaluator(_session_for(m)))


def apply_bias_updates(model: onnx.ModelProto, updates: dict[str, tuple[str, np.ndarray]]) -> onnx.ModelProto:
    """Set the bias of each named node (Conv/Gemm, or their fused ops) to new values."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits = {t.name: t for t in g.initializer}
    for node in g.node:
        if node.name not in updates:
            continue
        _, values = updates[node.name]
        pos = 3 if node.domain == "onnx_codebook" else 2
        if len(node.input) > pos and node.input[pos] and node.input[pos] in inits:
            name = node.input[pos]
            inits[name].CopyFrom(onnx.numpy_helper.from_array(values, name))
        else:
            name = f"{node.name}.bias_corrected"
            while name in inits:
                name += "_"
            t = onnx.numpy_helper.from_array(values.reshape(-1), name)
            g.initializer.append(t)
            inits[name] = t
            while len(node.input) < pos:
                node.input.append("")
            if len(node.input) == pos:
                node.input.append(name)
            else:
                node.input[pos] = name
    return out
