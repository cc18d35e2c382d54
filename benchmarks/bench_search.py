"""Accuracy-budget search vs the best uniform setting vs onnxruntime int8, side by side in one run.

For each model (bundled digits CNN on ``sklearn:digits``, bundled Fashion-MNIST CNN on the first 1000
Fashion-MNIST test images, EfficientNet-Lite0 on 200 augmented views of the 20 foolbox ImageNet photos):

* fp32 baseline top-1 and the fp32 bytes of the eligible weights (Conv/ConvTranspose/Gemm/MatMul weights
  with >= ``min_elements`` elements; the same ``min_elements`` for every column of that model);
* ``onnx_codebook.search(model, data, max_drop=1.0, metric="top1")`` with default settings, then with
  ``bias_correction=True`` and with ``activation_aware=True``: ratio, drop on the search / held-out split
  (from the report), drop re-measured on the FULL data with ``onnx_codebook.evaluate``, wall time,
  evaluations and profile runs;
* every uniform setting bits (2,3,4,5,6,8) x granularity (tensor, channel) via
  ``onnx_codebook.compress_with_report``, evaluated on the FULL data; the best (fewest stored bytes) meeting
  the budget (drop <= 1 point on the full data) per granularity;
* onnxruntime's ``quantize_static`` (QDQ, per-channel QInt8 weights, QUInt8 activations, MinMax
  calibration on the same data): file size, weight bytes (int8 weights + scales + zero points), top-1.

Results: ``benchmarks/results/search.md`` (tables, command, load average) and ``search.json`` (raw).

    PYTHONPATH=. python benchmarks/bench_search.py                       # everything (~30+ min on 2 cores)
    PYTHONPATH=. python benchmarks/bench_search.py --models digits --quick
    PYTHONPATH=. python benchmarks/bench_search.py --render              # re-write search.md from search.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(REPO)) if str(REPO) not in sys.path else None

import onnx  # noqa: E402
import onnx_codebook as oc  # noqa: E402
from onnx_codebook.data import Dataset, load_data  # noqa: E402

MAX_DROP = 1.0
BITS = (2, 3, 4, 5, 6, 8)
GRANULARITIES = ("tensor", "channel")
TARGET_VS_UNIFORM = 1.3
TARGET_RATIO = {"digits": 12.0, "fashion": 12.0, "effnet": 6.5}  # 12x: "the bundled model(s)"
TARGET_EFFNET_SECONDS = 600


def _bench_data():
    spec = importlib.util.spec_from_file_location("bench_data", HERE / "data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def model_specs(quick: bool) -> dict:
    """name -> (label, model path, data spec, data description, min_elements)."""
    bd = _bench_data()
    n_views = 200
    return {
        "digits": dict(label="digits_cnn (bundled)", model=str(REPO / "models" / "digits_cnn.onnx"),
                       data="sklearn:digits", data_desc="sklearn:digits, 597 held-out images (samples 1200-1796)",
                       min_elements=0),
        "fashion": dict(label="fashion_cnn (bundled)", model=str(REPO / "models" / "fashion_cnn.onnx"),
                        data=lambda: str(bd.fashion_mnist_npz(1000)),
                        data_desc="first 1000 Fashion-MNIST test images", min_elements=0),
        "effnet": dict(label="EfficientNet-Lite0", model=lambda: str(bd.efficientnet_lite0_onnx()),
                       data=lambda: str(bd.imagenet_photos_npz(n_views=n_views, seed=0)),
                       data_desc=f"{n_views} augmented views (seed 0) of the 20 foolbox ImageNet photos",
                       min_elements=4096),
    }


def _resolve(v):
    return v() if callable(v) else v


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.2f}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------ measuring


def eligible_fp32_bytes(model: onnx.ModelProto, min_elements: int) -> tuple[int, dict[str, int]]:
    """fp32 bytes of the weights the compressor may touch (same selection as compress/search)."""
    import onnx_graphsurgeon as gs
    from onnx_codebook.schema import SUPPORTED_OPS
    from onnx_codebook.select import constants_to_initializers, select_layers

    proto = onnx.ModelProto()
    proto.CopyFrom(model)
    constants_to_initializers(proto, SUPPORTED_OPS)
    layers, _ = select_layers(gs.import_onnx(proto), SUPPORTED_OPS, min_elements)
    sizes = {l.weight: l.size * 4 for l in layers}
    return sum(sizes.values()), sizes


def top1(model, data) -> float:
    return float(oc.evaluate(model, data)["top1"])


def run_search(name: str, model_path: str, data, min_elements: int, baseline: float, fp32_bytes: int, **kw) -> dict:
    t0 = time.perf_counter()
    load0 = load_avg()
    res = oc.search(model_path, data, max_drop=MAX_DROP, metric="top1", min_elements=min_elements, **kw)
    wall = time.perf_counter() - t0
    rep = res.report
    full = top1(res.model, data)
    hold = rep.get("holdout") or {}
    out = {
        "options": kw,
        "weight_bytes_before": rep["weight_bytes_before"], "weight_bytes_after": rep["weight_bytes_after"],
        "compression_ratio": rep["compression_ratio"],
        "ratio_vs_eligible_fp32": fp32_bytes / max(rep["weight_bytes_after"], 1),
        "search": rep["search"], "holdout": rep.get("holdout"), "target": rep["target"],
        "drop_search": rep["search"]["drop"], "drop_holdout": hold.get("drop"),
        "full_top1": full, "drop_full": baseline - full, "meets_budget_full": baseline - full <= MAX_DROP + 1e-9,
        "meets_budget_search": rep["search"]["drop"] <= MAX_DROP + 1e-9,
        "wall_time_s": wall, "report_wall_time_s": rep["wall_time_s"],
        "evaluations": rep["evaluations"], "profile_runs": rep["profile_runs"], "profile": rep["profile"],
        "warnings": rep["warnings"], "load_start": load0, "load_end": load_avg(),
        "layers": [{k: l[k] for k in ("name", "op", "shape", "bits", "granularity", "bytes_fp32", "bytes_stored",
                                      "bias_corrected")} for l in rep["layers"]],
        "points": [{"bytes": p["bytes"], "metric": p["metric"]} for p in rep["points"]],
        "pareto": rep["pareto"],
    }
    bits_hist: dict[str, int] = {}
    for l in rep["layers"]:
        key = "float" if l["bits"] == 32 else f"{l['bits']}b-{l['granularity'][0]}"
        bits_hist[key] = bits_hist.get(key, 0) + 1
    out["settings_histogram"] = dict(sorted(bits_hist.items()))
    log(f"{name}: search {kw or 'default'}: ratio {out['compression_ratio']:.2f}x, drop search "
        f"{out['drop_search']:.2f} / holdout {out['drop_holdout']} / full {out['drop_full']:.2f}, "
        f"{wall:.1f}s, {out['evaluations']} evals + {out['profile_runs']} profile runs; warnings {out['warnings']}")
    return out


def run_uniform(name: str, model_path: str, data, min_elements: int, baseline: float, fp32_bytes: int,
                fp32_sizes: dict[str, int], bits, grans) -> list[dict]:
    rows = []
    for g in grans:
        for b in bits:
            t0 = time.perf_counter()
            r = oc.compress_with_report(model_path, bits=b, granularity=g, min_elements=min_elements)
            t_comp = time.perf_counter() - t0
            compressed_fp32 = sum(l.bytes_fp32 for l in r.layers)
            # Eligible weights the compressor left alone (codebook would not pay) stay fp32.
            stored = fp32_bytes - compressed_fp32 + r.weight_bytes_after
            acc = top1(r.model, data)
            row = {"bits": b, "granularity": g, "layers_compressed": len(r.layers),
                   "weight_bytes_after": stored, "report_weight_bytes_after": r.weight_bytes_after,
                   "report_compression_ratio": r.weight_bytes_before / max(r.weight_bytes_after, 1),
                   "compression_ratio": fp32_bytes / max(stored, 1), "top1": acc, "drop": baseline - acc,
                   "meets_budget": baseline - acc <= MAX_DROP + 1e-9, "compress_s": t_comp,
                   "total_s": time.perf_counter() - t0}
            rows.append(row)
            log(f"{name}: uniform {b}b {g}: {row['compression_ratio']:.2f}x top1 {acc:.2f} (drop {row['drop']:.2f})"
                f" [{row['total_s']:.1f}s]")
    return rows


def run_ort_int8(name: str, model_path: str, data, fp32_sizes: dict[str, int], baseline: float) -> dict:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class _Reader(CalibrationDataReader):
        """The same data, in batches."""

        def __init__(self, ds: Dataset, batch: int):
            self.ds, self.batch, self.i = ds, batch, 0

        def get_next(self):
            if self.i >= len(self.ds):
                return None
            sl = slice(self.i, self.i + self.batch)
            self.i += self.batch
            return {k: v[sl] for k, v in self.ds.inputs.items()}

        def rewind(self):
            self.i = 0

    t0 = time.perf_counter()
    m = onnx.load(model_path)
    ds = load_data(data, m)
    out: dict = {"format": "QDQ", "per_channel": True, "weight_type": "QInt8", "activation_type": "QUInt8",
                 "calibration": f"MinMax on all {len(ds)} samples"}
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        q = Path(tmp) / "int8.onnx"
        src = model_path
        try:
            quant_pre_process(model_path, str(pre), skip_symbolic_shape=True)
            src = str(pre)
            out["pre_process"] = True
        except Exception as e:  # pre-processing is optional
            out["pre_process"] = f"failed: {str(e).splitlines()[0][:200]}"
        quantize_static(src, str(q), _Reader(ds, 20), quant_format=QuantFormat.QDQ, per_channel=True,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        out["file_bytes"] = q.stat().st_size
        out["fp32_file_bytes"] = Path(model_path).stat().st_size
        qm = onnx.load(str(q))
        inits = {t.name: t for t in qm.graph.initializer}
        wb = eligible_b = 0
        all_weight_b = 0
        for node in qm.graph.node:
            if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
                continue
            t = inits[node.input[0]]
            if t.data_type not in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
                continue  # int32 biases
            nbytes = sum(onnx.numpy_helper.to_array(inits[i]).nbytes for i in node.input if i in inits)
            all_weight_b += nbytes
            orig = node.input[0][: -len("_quantized")] if node.input[0].endswith("_quantized") else node.input[0]
            if orig in fp32_sizes:
                eligible_b += nbytes
                wb += 1
        out["weight_bytes"] = eligible_b  # int8 weights + scales + zero points of the eligible weights
        out["eligible_weights_quantized"] = wb
        out["eligible_weights"] = len(fp32_sizes)
        out["all_int8_weight_bytes"] = all_weight_b
        out["compression_ratio"] = sum(fp32_sizes.values()) / max(eligible_b, 1)
        acc = float(oc.evaluate(str(q), data)["top1"])
    out["top1"] = acc
    out["drop"] = baseline - acc
    out["meets_budget"] = baseline - acc <= MAX_DROP + 1e-9
    out["time_s"] = time.perf_counter() - t0
    log(f"{name}: ort int8: file {out['file_bytes']} B, weights {eligible_b} B ({out['compression_ratio']:.2f}x), "
        f"top1 {acc:.2f} (drop {out['drop']:.2f})")
    return out


def bench_model(name: str, spec: dict, quick: bool) -> dict:
    model_path = _resolve(spec["model"])
    data = _resolve(spec["data"])
    me = spec["min_elements"]
    m = onnx.load(model_path)
    n = len(load_data(data, m))
    fp32_bytes, sizes = eligible_fp32_bytes(m, me)
    baseline = top1(model_path, data)
    log(f"{name}: {n} samples, baseline top1 {baseline:.2f}, {len(sizes)} eligible weights, {fp32_bytes} fp32 B")
    res = {"label": spec["label"], "model": os.path.relpath(model_path, REPO) if model_path.startswith(str(REPO))
           else model_path.replace(str(Path.home()), "~"),
           "data": spec["data_desc"], "samples": n, "min_elements": me, "baseline_top1": baseline,
           "fp32_weight_bytes": fp32_bytes, "eligible_weights": len(sizes), "model_file_bytes": Path(model_path).stat().st_size,
           "load_start": load_avg()}
    variants = {"search": {}} if quick else {"search": {}, "search_bias_correction": {"bias_correction": True},
                                             "search_activation_aware": {"activation_aware": True}}
    res["searches"] = {}
    for key, kw in variants.items():
        try:
            res["searches"][key] = run_search(name, model_path, data, me, baseline, fp32_bytes, **kw)
        except Exception as e:
            traceback.print_exc()
            res["searches"][key] = {"options": kw, "error": f"{type(e).__name__}: {e}"}
    bits = (4, 8) if quick else BITS
    res["uniform"] = run_uniform(name, model_path, data, me, baseline, fp32_bytes, sizes, bits, GRANULARITIES)
    best = {}
    for g in GRANULARITIES:
        ok = [r for r in res["uniform"] if r["granularity"] == g and r["meets_budget"]]
        best[g] = min(ok, key=lambda r: r["weight_bytes_after"]) if ok else None
    res["best_uniform"] = best
    overall = [b for b in best.values() if b]
    best_all = min(overall, key=lambda r: r["weight_bytes_after"]) if overall else None
    res["best_uniform_overall"] = best_all
    for key, s in res["searches"].items():
        if "error" in s:
            continue
        s["vs_best_uniform"] = (best_all["weight_bytes_after"] / s["weight_bytes_after"]) if best_all else None
    try:
        res["ort_int8"] = run_ort_int8(name, model_path, data, sizes, baseline)
    except Exception as e:
        traceback.print_exc()
        res["ort_int8"] = {"error": f"{type(e).__name__}: {e}"}
    res["load_end"] = load_avg()
    return res


# ------------------------------------------------------------------------------------------ rendering


def _f(x, fmt="{:.2f}", none="–"):
    return none if x is None else fmt.format(x)


def _kb(b):
    return f"{b / 1024:,.1f} KiB" if b < 1024 * 1024 else f"{b / 1048576:,.2f} MiB"


VARIANT_LABEL = {"search": "search (default)", "search_bias_correction": "search + bias correction",
                 "search_activation_aware": "search + activation-aware"}


def render_model(name: str, r: dict) -> str:
    lines = [f"### {r['label']} — `{r['model']}`", "",
             f"Data: {r['data']} ({r['samples']} samples; search split {int(round(r['samples'] * 0.8))} / held-out "
             f"~{int(round(r['samples'] * 0.2))}, stratified). Eligible weights: {r['eligible_weights']} "
             f"Conv/ConvTranspose/Gemm/MatMul weights with >= {r['min_elements']} elements (`min_elements="
             f"{r['min_elements']}` in every column), {r['fp32_weight_bytes']:,} B fp32. "
             f"Load average at start / end of this model: {r['load_start']} / {r['load_end']}.", "",
             "| column | weight bytes | ratio | top-1 full | drop full | drop search / held-out | wall time | evals + profile runs |",
             "|---|---:|---:|---:|---:|---:|---:|---:|",
             f"| fp32 baseline | {r['fp32_weight_bytes']:,} | 1.00x | {r['baseline_top1']:.2f} | – | – | – | – |"]
    for key, s in r["searches"].items():
        lab = VARIANT_LABEL.get(key, key)
        if "error" in s:
            lines.append(f"| {lab} | **error**: {s['error'][:150]} | | | | | | |")
            continue
        lines.append(f"| {lab} | {s['weight_bytes_after']:,} | **{s['compression_ratio']:.2f}x** | {s['full_top1']:.2f} | "
                     f"{s['drop_full']:.2f} | {s['drop_search']:.2f} / {_f(s['drop_holdout'])} | {s['wall_time_s']:.0f} s | "
                     f"{s['evaluations']} + {s['profile_runs']} ({s['profile']}) |")
    for g in GRANULARITIES:
        b = r["best_uniform"].get(g)
        if b:
            lines.append(f"| best uniform per-{g} ({b['bits']}-bit) | {b['weight_bytes_after']:,} | {b['compression_ratio']:.2f}x | "
                         f"{b['top1']:.2f} | {b['drop']:.2f} | – | – | – |")
        else:
            lines.append(f"| best uniform per-{g} | none meets the budget | | | | | | |")
    q = r.get("ort_int8", {})
    if "error" in q:
        lines.append(f"| onnxruntime int8 (QDQ) | **error**: {q['error'][:150]} | | | | | | |")
    elif q:
        lines.append(f"| onnxruntime int8 (QDQ, per-channel) | {q['weight_bytes']:,} | {q['compression_ratio']:.2f}x | "
                     f"{q['top1']:.2f} | {q['drop']:.2f} | – | {q['time_s']:.0f} s | – |")
    lines.append("")
    # targets
    checks = []
    tgt = TARGET_RATIO.get(name)
    for key, s in r["searches"].items():
        if "error" in s:
            continue
        lab = VARIANT_LABEL.get(key, key)
        parts = []
        if tgt:
            parts.append(f"ratio {s['compression_ratio']:.2f}x vs target {tgt}x: {'met' if s['compression_ratio'] >= tgt else '**MISSED**'}")
        vs = s.get("vs_best_uniform")
        parts.append(f"vs best uniform {_f(vs)}x (target >= {TARGET_VS_UNIFORM}x: "
                     f"{'met' if vs and vs >= TARGET_VS_UNIFORM else '**MISSED**'})")
        parts.append(f"budget on search split: {'met' if s['meets_budget_search'] else '**MISSED**'}; "
                     f"on full data: {'met' if s['meets_budget_full'] else '**MISSED**'}")
        if name == "effnet":
            parts.append(f"wall {s['wall_time_s']:.0f} s vs 600 s: {'met' if s['wall_time_s'] <= TARGET_EFFNET_SECONDS else '**MISSED**'}")
        if s["warnings"]:
            parts.append(f"warnings: {'; '.join(s['warnings'])}")
        checks.append(f"- {lab}: " + "; ".join(parts))
    lines += ["Targets:", *checks, ""]
    # uniform grid
    lines += ["Uniform grid (full data; ratio = eligible fp32 bytes / stored bytes, eligible layers the compressor "
              "leaves alone counted as fp32):", "",
              "| bits | " + " | ".join(f"per-{g}: bytes / ratio / top-1 / drop" for g in GRANULARITIES) + " |",
              "|---:|" + "---|" * len(GRANULARITIES)]
    by = {(u["bits"], u["granularity"]): u for u in r["uniform"]}
    for b in sorted({u["bits"] for u in r["uniform"]}):
        cells = []
        for g in GRANULARITIES:
            u = by.get((b, g))
            cells.append("–" if not u else f"{u['weight_bytes_after']:,} / {u['compression_ratio']:.2f}x / {u['top1']:.2f} / "
                         f"{u['drop']:.2f}{'' if u['meets_budget'] else ' ✗'}")
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    lines.append("")
    # search settings
    for key, s in r["searches"].items():
        if "error" not in s:
            lines.append(f"- {VARIANT_LABEL.get(key, key)} per-layer settings: "
                         + ", ".join(f"{k} x{v}" for k, v in s["settings_histogram"].items())
                         + f"; search split {s['search']['baseline']:.2f} -> {s['search']['compressed']:.2f}"
                         + (f", held-out {s['holdout']['baseline']:.2f} -> {s['holdout']['compressed']:.2f} "
                            f"({s['holdout']['samples']} samples)" if s.get("holdout") else ""))
    if q and "error" not in q:
        lines.append(f"- onnxruntime int8: {q['file_bytes']:,} B file (fp32 file {q['fp32_file_bytes']:,} B); weight bytes = "
                     f"int8 weights + fp32 scales + int8 zero points of the {q['eligible_weights_quantized']}/"
                     f"{q['eligible_weights']} eligible weights ({q['all_int8_weight_bytes']:,} B for all quantized "
                     f"weights); pre-process: {q['pre_process']}; {q['calibration']}, activations {q['activation_type']}")
    lines.append("")
    return "\n".join(lines)


def render(doc: dict) -> str:
    out = ["# Accuracy-budget search benchmark", "",
           f"Command: `{doc['command']}`", "",
           f"Run: {doc['started']} → {doc['finished']}; {doc['machine']}; onnxruntime {doc['onnxruntime']}; "
           f"load average (1/5/15 min) at start {doc['load_start']}, at end {doc['load_end']} (2 cores shared with "
           "other jobs, so wall times are noisy).", "",
           f"Budget: `onnx_codebook.search(model, data, max_drop={MAX_DROP}, metric=\"top1\")` with the default bits "
           "2,3,4,5,6,8, granularity tensor+channel, holdout 0.2, standard format. \"Ratio\" = fp32 bytes of the "
           "eligible weights / stored bytes (indices + codebooks + offsets; the search report's `compression_ratio`). "
           "Drops are in top-1 points; \"drop full\" is re-measured with `onnx_codebook.evaluate` on all samples. "
           "A uniform setting meets the budget when its drop on the full data is <= 1 point.", ""]
    out += ["## Summary (default search unless named)", "",
            "| model | fp32 top-1 | search ratio (target) | drop search / held-out / full | search wall | "
            "+ bias corr. ratio / drop full | + act.-aware ratio / drop full | best uniform (ratio, drop) | "
            "search / best uniform (>= 1.3x) | ORT int8 ratio / drop |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in doc["models"].items():
        s = r["searches"].get("search", {})
        bu = r.get("best_uniform_overall")
        q = r.get("ort_int8", {})

        def var(key):
            v = r["searches"].get(key)
            if not v:
                return "–"
            return "error" if "error" in v else f"{v['compression_ratio']:.2f}x / {v['drop_full']:.2f}"

        tgt = TARGET_RATIO.get(name)
        if "error" in s or not s:
            row = f"| {r['label']} | {r['baseline_top1']:.2f} | error | | | {var('search_bias_correction')} | {var('search_activation_aware')} |"
        else:
            row = (f"| {r['label']} | {r['baseline_top1']:.2f} | **{s['compression_ratio']:.2f}x** ({_f(tgt, '{:g}x')}) | "
                   f"{s['drop_search']:.2f} / {_f(s['drop_holdout'])} / {s['drop_full']:.2f} | {s['wall_time_s']:.0f} s | "
                   f"{var('search_bias_correction')} | {var('search_activation_aware')} |")
        row += (f" {bu['bits']}-bit per-{bu['granularity']} ({bu['compression_ratio']:.2f}x, {bu['drop']:.2f})" if bu else " none")
        row += f" | {_f(s.get('vs_best_uniform'))}x |"
        row += (f" {q['compression_ratio']:.2f}x / {q['drop']:.2f} |" if q and "error" not in q else " error |")
        out.append(row)
    out.append("")
    if doc.get("notes"):
        out += ["## Observations", "", *[f"- {n}" for n in doc["notes"]], ""]
    out += ["## Per model", ""]
    for name, r in doc["models"].items():
        out.append(render_model(name, r))
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="digits,fashion,effnet", help="comma list of digits,fashion,effnet")
    p.add_argument("--quick", action="store_true", help="default search only; uniform bits 4,8 only")
    p.add_argument("--out", default=str(RESULTS), help="folder for search.md / search.json")
    p.add_argument("--render", action="store_true", help="only re-write search.md from search.json")
    args = p.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    jpath, mpath = out_dir / "search.json", out_dir / "search.md"
    if args.render:
        doc = json.loads(jpath.read_text())
        mpath.write_text(render(doc))
        print(render(doc))
        return 0
    import onnxruntime as ort

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    specs = model_specs(args.quick)
    unknown = set(names) - set(specs)
    if unknown:
        p.error(f"unknown model(s) {', '.join(sorted(unknown))}")
    cmd = "PYTHONPATH=. python benchmarks/bench_search.py" + "".join(f" {shlex.quote(a)}" for a in (argv or sys.argv[1:]))
    doc = {"command": cmd, "quick": args.quick, "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
           "onnxruntime": ort.__version__, "onnx_codebook": oc.__version__, "max_drop": MAX_DROP,
           "load_start": load_avg(), "models": {}}
    log(f"start; load {doc['load_start']}")
    for name in names:
        doc["models"][name] = bench_model(name, specs[name], args.quick)
        doc["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        doc["load_end"] = load_avg()
        jpath.write_text(json.dumps(doc, indent=1, default=str))  # partial results survive a crash
        print(render_model(name, doc["models"][name]), flush=True)
    mpath.write_text(render(doc))
    log(f"done; load {doc['load_end']}; wrote {mpath} and {jpath}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
