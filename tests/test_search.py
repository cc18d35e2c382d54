"""Accuracy-budget search: budget kept, beats uniform settings, edge budgets, bad data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

import onnx_codebook as oc
from onnx_codebook.cli import app
from onnx_codebook.errors import ConfigError
from onnx_codebook.data import Dataset
from onnx_codebook.budget import pareto_front

from conftest import weights_listed_as_inputs

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits_cnn.onnx"
BITS = (2, 3, 4, 5, 6, 8)
GRANULARITIES = ("tensor", "channel")


def _stderr_lines(result) -> list[str]:
    text = result.stderr if hasattr(result, "stderr") and result.stderr is not None else result.output
    return [line for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def digits_search(tmp_path_factory):
    out = tmp_path_factory.mktemp("search") / "s.onnx"
    report = out.with_suffix(".json")
    result = CliRunner().invoke(app, ["search", str(DIGITS), "-o", str(out), "--data", "sklearn:digits",
                                      "--max-drop", "1", "--min-elements", "0", "--report", str(report)])
    assert result.exit_code == 0, result.output
    return out, json.loads(report.read_text())


def test_search_meets_budget_when_remeasured(digits_search):
    out, report = digits_search
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    base = oc.evaluate(DIGITS, "sklearn:digits")["top1"]
    comp = oc.evaluate(out, "sklearn:digits")["top1"]
    assert base - comp <= 1.0 + 1e-9
    assert report["search"]["drop"] <= 1.0 + 1e-9
    assert report["holdout"]["samples"] > 0
    assert report["compression_ratio"] > 4
    # Every evaluated point is reported, and the Pareto front is a subset of them, sorted by bytes.
    pts = {(p["bytes"], p["metric"]) for p in report["points"]}
    front = [(p["bytes"], p["metric"]) for p in report["pareto"]]
    assert set(front) <= pts and front == sorted(front)


def test_search_beats_every_uniform_setting_within_budget(digits_search):
    _, report = digits_search
    searched = report["weight_bytes_after"]
    base = oc.evaluate(DIGITS, "sklearn:digits")["top1"]
    feasible = []
    for bits in BITS:
        for gran in GRANULARITIES:
            res = oc.compress_with_report(str(DIGITS), bits=bits, granularity=gran, min_elements=0)
            drop = base - oc.evaluate(res.model, "sklearn:digits")["top1"]
            if drop <= 1.0:
                stored = res.weight_bytes_after + sum(
                    4 * int(np.prod(r["shape"])) for r in report["layers"] if r["name"] not in
                    {l.name for l in res.layers})
                feasible.append((stored, bits, gran))
    assert feasible, "some uniform setting should meet a 1-point budget on this model"
    for stored, bits, gran in feasible:
        assert searched < stored, f"search ({searched} B) is not smaller than uniform {bits}b/{gran} ({stored} B)"


def test_zero_budget_is_no_worse_than_baseline():
    result = oc.search(DIGITS, "sklearn:digits", max_drop=0.0, bits=(2, 4, 8), granularity="tensor", min_elements=0)
    assert result.report["search"]["compressed"] >= result.report["search"]["baseline"]


def test_impossible_budget_returns_least_compressed_with_warning():
    model = onnx.load(str(DIGITS))
    digits = oc.data.load_data("sklearn:digits", model)
    x = digits.inputs["input"][:64]
    reference = oc.session(model).run(None, {"input": x})[0]

    def bit_exact(session) -> float:
        # 100 only for outputs identical to the original's: no compressed model can meet max_drop=0.
        return 100.0 if np.array_equal(session.run(None, {"input": x})[0], reference) else 0.0

    result = oc.search(model, data=digits, evaluator=bit_exact, max_drop=0.0, bits=(1, 2),
                       granularity="tensor", min_elements=0)
    assert result.warnings and "no setting meets the budget" in result.warnings[0]
    onnx.checker.check_model(result.model, full_check=True)
    # The least-compressed candidate: every layer compressed at its lowest-noise option (2 bits here).
    assert all(l["bits"] == 2 for l in result.report["layers"])


def test_relative_budget_and_agreement_metric_need_no_labels():
    digits = oc.data.load_data("sklearn:digits", onnx.load(str(DIGITS)))
    unlabelled = Dataset(digits.inputs, None)
    result = oc.search(DIGITS, unlabelled, max_drop=1.0, drop_type="relative", metric="agreement",
                       bits=(2, 4, 8), granularity="tensor", min_elements=0)
    rep = result.report
    assert rep["metric"] == "agreement" and rep["search"]["baseline"] == 100.0
    assert rep["search"]["compressed"] >= 99.0 - 1e-9


def test_ir3_model_with_weights_listed_as_inputs_is_searched():
    # IR 3 lists every initializer as a graph input; those are still weights to search over
    model = onnx.load(str(DIGITS))
    old = weights_listed_as_inputs(model, ir_version=3)
    digits = oc.data.load_data("sklearn:digits", model)
    result = oc.search(old, digits, max_drop=5.0, metric="agreement", bits=(4, 8), granularity="tensor")
    assert result.report["layers"] and [i.name for i in result.model.graph.input] == [model.graph.input[0].name]
    assert result.report["search"]["drop"] <= 5.0 + 1e-9


def test_weights_listed_as_inputs_are_searched_with_weight_inputs():
    model = onnx.load(str(DIGITS))
    listed = weights_listed_as_inputs(model)
    digits = oc.data.load_data("sklearn:digits", model)
    with pytest.raises(ConfigError, match="--weight-inputs"):
        oc.search(listed, digits, max_drop=5.0, metric="agreement", bits=(4,), granularity="tensor")
    result = oc.search(listed, digits, max_drop=5.0, metric="agreement", bits=(4, 8), granularity="tensor",
                       weight_inputs=True)
    assert result.report["layers"] and [i.name for i in result.model.graph.input] == [model.graph.input[0].name]


@pytest.mark.parametrize("held_in", ["initializer", "Constant node"])
def test_float16_weights_behind_a_cast_are_searched_at_their_stored_size(held_in):
    # Mixed-precision exports keep weights as float16 and Cast them to float: the search
    # clusters them and counts their 2 bytes per value, also where a Constant node holds them
    model = onnx.load(str(DIGITS))
    mixed = onnx.ModelProto()
    mixed.CopyFrom(model)
    weights = {n.input[1] for n in mixed.graph.node if n.op_type in ("Conv", "Gemm")}
    inits = [t for t in mixed.graph.initializer if t.name in weights]
    for t in inits:
        half = onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t).astype(np.float16), t.name + ".fp16")
        mixed.graph.initializer.remove(t)
        mixed.graph.node.insert(0, onnx.helper.make_node("Cast", [half.name], [t.name], to=onnx.TensorProto.FLOAT))
        if held_in == "initializer":
            mixed.graph.initializer.append(half)
        else:
            mixed.graph.node.insert(0, onnx.helper.make_node("Constant", [], [half.name], value=half))
    digits = oc.data.load_data("sklearn:digits", model)
    result = oc.search(mixed, digits, max_drop=5.0, metric="agreement", bits=(4, 8), granularity="tensor")
    assert any("read through Cast" in w for w in result.warnings)
    layers = result.report["layers"]
    assert layers and all(l["bytes_original"] * 2 == l["bytes_fp32"] for l in layers)
    assert result.report["weight_bytes_before"] == sum(l["bytes_original"] for l in layers)
    assert result.report["search"]["drop"] <= 5.0 + 1e-9


def test_user_evaluator_drives_verification():
    model = onnx.load(str(DIGITS))
    digits = oc.data.load_data("sklearn:digits", model)
    calls = []

    def accuracy(session) -> float:
        calls.append(1)
        name = session.get_inputs()[0].name
        logits = session.run(None, {name: digits.inputs[name]})[0]
        return float(np.mean(np.argmax(logits, 1) == digits.labels) * 100)

    result = oc.search(model, data=digits, evaluator=accuracy, max_drop=2.0, bits=(2, 4), granularity="tensor",
                       min_elements=0)
    assert calls, "the evaluator was never called"
    assert result.report["search"]["drop"] <= 2.0 + 1e-9
    assert accuracy(oc.session(result.model)) >= accuracy(oc.session(model)) - 2.0 - 1e-9


def test_bias_correction_and_activation_aware_run_and_keep_budget():
    result = oc.search(DIGITS, "sklearn:digits", max_drop=1.0, bits=(2, 3, 4), granularity="tensor",
                       min_elements=0, bias_correction=True, activation_aware=True)
    rep = result.report
    assert rep["bias_correction"] and rep["activation_aware"]
    assert any(l["bias_corrected"] for l in rep["layers"])
    assert rep["search"]["drop"] <= 1.0 + 1e-9
    onnx.checker.check_model(result.model, full_check=True)


def test_pareto_front():
    pts = [(10, 90.0), (5, 80.0), (7, 85.0), (8, 84.0), (12, 89.0), (5, 79.0)]
    assert pareto_front(pts) == [(5, 80.0), (7, 85.0), (10, 90.0)]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: {"inputs": np.zeros((4, 1, 9, 9), np.float32), "labels": np.zeros(4, np.int64)}, "shape"),
        (lambda d: {"inputs": d.inputs["input"][:40], "labels": np.full(40, 12)}, "out of range"),
        (lambda d: {"inputs": np.zeros((0, 1, 8, 8), np.float32)}, "empty"),
        (lambda d: {"inputs": d.inputs["input"][:40]}, "labels"),
    ],
    ids=["shape", "labels-range", "empty", "top1-without-labels"],
)
def test_bad_data_is_one_line_exit_2(tmp_path, make, message):
    digits = oc.data.load_data("sklearn:digits", onnx.load(str(DIGITS)))
    npz = tmp_path / "bad.npz"
    np.savez(npz, **make(digits))
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(app, ["search", str(DIGITS), "-o", str(out), "--data", str(npz),
                                      "--metric", "top1", "--min-elements", "0"])
    assert result.exit_code == 2, result.output
    lines = _stderr_lines(result)
    assert len(lines) == 1 and "Traceback" not in result.output
    assert message in lines[0]
    assert not out.exists()


def test_process_pool_gives_the_same_result_as_in_process():
    opts = dict(max_drop=1.0, bits=(2, 4, 8), granularity="tensor", min_elements=0)
    one = oc.search(DIGITS, "sklearn:digits", workers=1, **opts).report
    two = oc.search(DIGITS, "sklearn:digits", workers=2, **opts).report
    assert [l["bits"] for l in one["layers"]] == [l["bits"] for l in two["layers"]]
    assert one["weight_bytes_after"] == two["weight_bytes_after"]
    assert one["search"] == two["search"]
