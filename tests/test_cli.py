"""The command line: happy paths, the --report JSON, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

import onnx_codebook as oc
from onnx_codebook.cli import app

from conftest import feeds_for, run, small_cnn

REPO = Path(__file__).resolve().parents[1]
DIGITS_MODEL = REPO / "models" / "digits_cnn.onnx"
REPORT_KEYS = {"model_bytes_before", "model_bytes_after", "weight_bytes_before", "weight_bytes_after",
               "compression_ratio", "layers"}


def invoke(*args):
    # typer's CliRunner keeps stdout and stderr apart (result.stdout / result.stderr).
    return CliRunner().invoke(app, [str(a) for a in args])


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def assert_ok(result):
    assert result.exit_code == 0, result.output
    assert result.exception is None


def assert_one_line_error(result, folder: Path | None = None, before: list[str] | None = None, match: str = ""):
    """Exit code 2, exactly one line on stderr, no traceback, nothing written."""
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:")
    assert match.lower() in lines[0].lower()
    assert "Traceback" not in result.output
    if folder is not None:
        assert listing(folder) == before


@pytest.fixture
def work(tmp_path, cnn_path):
    """A folder holding a copy of the small CNN."""
    shutil.copy(cnn_path, tmp_path / "m.onnx")
    return tmp_path


# --------------------------------------------------------------------------- happy paths


def test_compress_inspect_decompress_evaluate(work, rng):
    model = work / "m.onnx"
    out, report = work / "c.onnx", work / "r.json"
    result = invoke("compress", model, "-o", out, "--bits", 4, "--granularity", "channel", "--min-elements", 0,
                    "--report", report)
    assert_ok(result)
    assert "fc.weight" in result.stdout
    onnx.checker.check_model(str(out), full_check=True)
    original = onnx.load(str(model))
    compressed = onnx.load(str(out))
    feeds = feeds_for(original, rng, 3)
    assert np.allclose(run(compressed, feeds)[0], run(original, feeds)[0], rtol=0.3, atol=0.3)

    payload = json.loads(report.read_text())
    assert REPORT_KEYS <= set(payload)
    assert payload["model_bytes_before"] == model.stat().st_size
    assert payload["model_bytes_after"] == out.stat().st_size
    assert payload["weight_bytes_before"] == 4 * (144 + 4608 + 320)
    assert payload["compression_ratio"] == pytest.approx(payload["weight_bytes_before"] / payload["weight_bytes_after"])
    assert [layer["name"] for layer in payload["layers"]] == ["conv1.weight", "conv2.weight", "fc.weight"]
    assert all(layer["bits"] == 4 and layer["bytes_stored"] < layer["bytes_fp32"] for layer in payload["layers"])

    result = invoke("inspect", out, "--json")
    assert_ok(result)
    info = json.loads(result.stdout)
    assert info["compressed_layers"] == 3
    assert info["weight_bytes_stored"] == payload["weight_bytes_after"]
    assert {"weight_bytes_fp32", "weight_bytes_stored", "compression_ratio"} <= set(info)
    assert_ok(invoke("inspect", out))

    plain = work / "d.onnx"
    assert_ok(invoke("decompress", out, "-o", plain))
    np.testing.assert_array_equal(run(onnx.load(str(plain)), feeds)[0], run(compressed, feeds)[0])

    result = invoke("evaluate", out, "--data", "sklearn:digits", "--reference", model, "--json")
    assert_ok(result)
    metrics = json.loads(result.stdout)
    row = metrics["c.onnx"]
    assert row["samples"] == 597 and {"top1", "top5", "agreement", "sqnr_db"} <= set(row)
    assert_ok(invoke("evaluate", out, "--data", "sklearn:digits"))
    # Only the files asked for were written.
    assert listing(work) == ["c.onnx", "d.onnx", "m.onnx", "r.json"]


def test_file_sizes_count_external_data(work):
    # A model saved with its tensors in a separate file (as torch.onnx.export's dynamo
    # exporter does for large models): the input size reported is model file + data file.
    model = work / "ext.onnx"
    onnx.save(onnx.load(str(work / "m.onnx")), str(model), save_as_external_data=True,
              all_tensors_to_one_file=True, location="ext.onnx.data", size_threshold=0)
    on_disk = model.stat().st_size + (work / "ext.onnx.data").stat().st_size
    report = work / "r.json"
    assert_ok(invoke("compress", model, "-o", work / "c.onnx", "--min-elements", 0, "--report", report))
    payload = json.loads(report.read_text())
    assert payload["model_bytes_before"] == on_disk > 4 * (144 + 4608 + 320)
    result = invoke("inspect", model, "--json")
    assert_ok(result)
    assert json.loads(result.stdout)["model_bytes"] == on_disk


def test_compress_force_overwrites_the_input(work):
    model = work / "m.onnx"
    assert_ok(invoke("compress", model, "-o", model, "--min-elements", 0, "--bits", 3, "--force"))
    assert oc.inspect(model)["compressed_layers"] == 3
    assert listing(work) == ["m.onnx"]


def test_evaluate_npz_and_image_folder(work):
    rng = np.random.default_rng(0)
    np.savez(work / "d.npz", inputs=rng.random((6, 1, 8, 8)).astype(np.float32), labels=np.arange(6))
    result = invoke("evaluate", work / "m.onnx", "--data", work / "d.npz", "--json")
    assert_ok(result)
    assert json.loads(result.stdout)["samples"] == 6
    from PIL import Image

    for cls in ("a", "b"):
        (work / "imgs" / cls).mkdir(parents=True)
        Image.new("L", (10, 10), 128).save(work / "imgs" / cls / "0.png")
    result = invoke("evaluate", work / "m.onnx", "--data", work / "imgs", "--crop", 8, "--json")
    assert_ok(result)
    assert json.loads(result.stdout)["samples"] == 2


# --------------------------------------------------------------------------- bad input


def test_binary_method_defaults_to_one_bit(work):
    # --method binary alone means 1 bit per weight (the default 4 is for k-means)
    out = work / "b.onnx"
    assert_ok(invoke("compress", work / "m.onnx", "-o", out, "--method", "binary", "--granularity", "group",
                     "--min-elements", 0))
    assert {layer["bits"] for layer in oc.inspect(out)["layers"] if layer["format"] != "float"} == {1}


@pytest.mark.parametrize("case", ["missing", "text", "truncated", "no_eligible", "bits0", "bits9", "same_output",
                                  "missing_folder", "parent_is_file", "bad_granularity", "bad_ops", "binary_bits"])
def test_compress_bad_input(work, case):
    model = work / "m.onnx"
    (work / "notes.txt").write_text("hello\n")
    data = model.read_bytes()
    (work / "half.onnx").write_bytes(data[: len(data) // 2])
    before = listing(work)
    out = work / "out.onnx"
    args = {
        "missing": (work / "nope.onnx", "-o", out),
        "text": (work / "notes.txt", "-o", out),
        "truncated": (work / "half.onnx", "-o", out),
        "no_eligible": (model, "-o", out, "--min-elements", 10**9),
        "bits0": (model, "-o", out, "--bits", 0),
        "bits9": (model, "-o", out, "--bits", 9),
        "same_output": (model, "-o", model),
        "missing_folder": (model, "-o", work / "no" / "such" / "c.onnx"),
        "parent_is_file": (model, "-o", work / "notes.txt" / "c.onnx"),
        "bad_granularity": (model, "-o", out, "--granularity", "layer"),
        "bad_ops": (model, "-o", out, "--ops", "Conv,LSTM"),
        "binary_bits": (model, "-o", out, "--method", "binary", "--bits", 4),
    }[case]
    result = invoke("compress", *args, "--min-elements", 0) if case not in ("no_eligible",) else invoke("compress", *args)
    assert_one_line_error(result, work, before)
    assert model.read_bytes() == data


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_compress_unwritable_folder(work):
    locked = work / "locked"
    locked.mkdir(mode=0o555)
    before = listing(work)
    result = invoke("compress", work / "m.onnx", "-o", locked / "c.onnx", "--min-elements", 0)
    assert_one_line_error(result, work, before, match="not writable")


def test_failed_write_leaves_no_temp_files(work, monkeypatch):
    before = listing(work)

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", fail)
    result = invoke("compress", work / "m.onnx", "-o", work / "c.onnx", "--min-elements", 0)
    assert_one_line_error(result, work, before, match="no space left")


def test_bad_report_path(work):
    before = listing(work)
    result = invoke("compress", work / "m.onnx", "-o", work / "c.onnx", "--min-elements", 0,
                    "--report", work / "no" / "r.json")
    assert_one_line_error(result, work, before)


def test_inspect_and_decompress_bad_input(work):
    (work / "notes.txt").write_text("hello\n")
    before = listing(work)
    assert_one_line_error(invoke("inspect", work / "nope.onnx"), work, before)
    assert_one_line_error(invoke("inspect", work / "notes.txt"), work, before)
    assert_one_line_error(invoke("decompress", work / "nope.onnx", "-o", work / "d.onnx"), work, before)
    # A model without codebooks has nothing to decompress.
    assert_one_line_error(invoke("decompress", work / "m.onnx", "-o", work / "d.onnx"), work, before)


@pytest.mark.parametrize("case", ["shape", "labels_out_of_range", "missing_data", "unknown_builtin", "missing_model"])
def test_evaluate_bad_input(work, case):
    rng = np.random.default_rng(0)
    np.savez(work / "shape.npz", inputs=rng.random((4, 1, 9, 9)).astype(np.float32))
    np.savez(work / "labels.npz", inputs=rng.random((4, 1, 8, 8)).astype(np.float32), labels=[0, 1, 2, 99])
    before = listing(work)
    model, data = {
        "shape": (work / "m.onnx", work / "shape.npz"),
        "labels_out_of_range": (work / "m.onnx", work / "labels.npz"),
        "missing_data": (work / "m.onnx", work / "nope.npz"),
        "unknown_builtin": (work / "m.onnx", "sklearn:nope"),
        "missing_model": (work / "nope.onnx", "sklearn:digits"),
    }[case]
    assert_one_line_error(invoke("evaluate", model, "--data", data), work, before)


# --------------------------------------------------------------------------- the bundled model


needs_digits = pytest.mark.skipif(not DIGITS_MODEL.is_file(), reason="models/digits_cnn.onnx not built yet")


@pytest.fixture(scope="module")
def digits_compressed(tmp_path_factory):
    """The issue's acceptance run: ``compress models/digits_cnn.onnx --bits 4 --granularity channel``."""
    out = tmp_path_factory.mktemp("digits") / "c.onnx"
    assert_ok(invoke("compress", DIGITS_MODEL, "-o", out, "--bits", 4, "--granularity", "channel"))
    return out


@needs_digits
def test_bundled_digits_model_is_valid_and_accurate(digits_compressed):
    onnx.checker.check_model(str(digits_compressed), full_check=True)
    before = oc.evaluate(DIGITS_MODEL, "sklearn:digits")["top1"]
    after = oc.evaluate(digits_compressed, "sklearn:digits", reference=DIGITS_MODEL)
    assert after["samples"] == 597
    assert abs(after["top1"] - before) <= 1.0


@needs_digits
def test_bundled_digits_model_file_is_6x_smaller(digits_compressed):
    ratio = DIGITS_MODEL.stat().st_size / digits_compressed.stat().st_size
    assert ratio >= 6.0, f"file only {ratio:.2f}x smaller"
