"""Evaluation data: .npz, image folders, sklearn:digits, checked against the model's inputs."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper
from PIL import Image

from onnx_codebook.data import Dataset, ImageOptions, load_data, model_inputs
from onnx_codebook.errors import DataError

from conftest import make_model, small_cnn


def image_model(shape):
    """Identity-like model with one input of ``shape`` (N symbolic)."""
    x = helper.make_tensor_value_info("img", TensorProto.FLOAT, ["N", *shape])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", *shape])
    return make_model([helper.make_node("Identity", ["img"], ["out"])], [x], [y])


def two_input_model():
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 3])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    return make_model([helper.make_node("Add", ["a", "b"], ["y"])], [a, b], [y])


def test_sklearn_digits(rng):
    model = small_cnn(rng)
    data = load_data("sklearn:digits", model)
    assert len(data) == 597
    x = data.inputs["X"]
    assert x.shape == (597, 1, 8, 8) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert data.labels.shape == (597,) and set(np.unique(data.labels)) == set(range(10))
    assert len(load_data("sklearn:digits:train", model)) == 1200
    assert len(load_data("sklearn:digits:all", model)) == 1797
    with pytest.raises(DataError, match="unknown built-in"):
        load_data("sklearn:iris", model)


def test_npz_with_inputs_and_labels(rng, tmp_path):
    model = small_cnn(rng)
    x = rng.random((7, 1, 8, 8))  # float64 is cast to the model's float32
    np.savez(tmp_path / "d.npz", inputs=x, labels=np.arange(7) % 3)
    data = load_data(tmp_path / "d.npz", model)
    assert data.inputs["X"].dtype == np.float32
    np.testing.assert_allclose(data.inputs["X"], x.astype(np.float32))
    np.testing.assert_array_equal(data.labels, np.arange(7) % 3)
    np.savez(tmp_path / "nolabels.npz", inputs=x)
    assert load_data(str(tmp_path / "nolabels.npz"), model).labels is None


def test_npz_per_input_name(rng, tmp_path):
    model = two_input_model()
    np.savez(tmp_path / "d.npz", a=np.ones((4, 3), np.float32), b=np.zeros((4, 3), np.float32))
    data = load_data(tmp_path / "d.npz", model)
    assert set(data.inputs) == {"a", "b"}
    np.savez(tmp_path / "one.npz", inputs=np.ones((4, 3), np.float32))
    with pytest.raises(DataError, match="one array per input"):
        load_data(tmp_path / "one.npz", model)
    np.savez(tmp_path / "missing.npz", a=np.ones((4, 3), np.float32))
    with pytest.raises(DataError, match="'b'"):
        load_data(tmp_path / "missing.npz", model)
    np.savez(tmp_path / "uneven.npz", a=np.ones((4, 3), np.float32), b=np.ones((5, 3), np.float32))
    with pytest.raises(DataError, match="numbers of samples"):
        load_data(tmp_path / "uneven.npz", model)


@pytest.mark.parametrize("inputs, match", [
    (np.zeros((5, 1, 9, 9), np.float32), "shape"),
    (np.zeros((5, 64), np.float32), "shape"),
    (np.zeros((0, 1, 8, 8), np.float32), "empty"),
    (np.full((2, 1, 8, 8), np.nan, np.float32), "finite"),
])
def test_data_that_does_not_fit(rng, tmp_path, inputs, match):
    np.savez(tmp_path / "d.npz", inputs=inputs)
    with pytest.raises(DataError, match=match):
        load_data(tmp_path / "d.npz", small_cnn(rng))


@pytest.mark.parametrize("labels, match", [
    (np.arange(4), "4 labels for 5"), (np.array([0, 1, -1, 2, 3]), ">= 0"), (np.array([0.5, 1, 2, 3, 4]), "integer")])
def test_bad_labels(rng, tmp_path, labels, match):
    np.savez(tmp_path / "d.npz", inputs=np.zeros((5, 1, 8, 8), np.float32), labels=labels)
    with pytest.raises(DataError, match=match):
        load_data(tmp_path / "d.npz", small_cnn(rng))


def test_bad_files(rng, tmp_path):
    model = small_cnn(rng)
    with pytest.raises(DataError, match="no such"):
        load_data(tmp_path / "nope.npz", model)
    (tmp_path / "bad.npz").write_text("not a zip")
    with pytest.raises(DataError, match="not a readable"):
        load_data(tmp_path / "bad.npz", model)
    (tmp_path / "d.csv").write_text("1,2,3")
    with pytest.raises(DataError, match="unsupported"):
        load_data(tmp_path / "d.csv", model)
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(DataError, match="subfolder"):
        load_data(tmp_path / "empty_folder", model)


def write_images(root, sizes=((12, 10), (12, 10)), mode="RGB"):
    """Two classes ('cat' < 'dog'), one image per size; pixel value = 10 * class + image number."""
    for label, cls in enumerate(("cat", "dog")):
        (root / cls).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            value = 10 * label + i
            Image.new(mode, (w, h), (value, value, value) if mode == "RGB" else value).save(root / cls / f"{i}.png")
    (root / "cat" / "readme.txt").write_text("ignored")


def test_image_folder_nchw(tmp_path):
    write_images(tmp_path)
    opts = ImageOptions(size=8, crop=6, scale=1.0, mean=(1.0, 2.0, 3.0), std=(2.0, 2.0, 2.0))
    data = load_data(tmp_path, image_model([3, 6, 6]), opts)
    x = data.inputs["img"]
    assert x.shape == (4, 3, 6, 6) and x.dtype == np.float32
    assert data.classes == ["cat", "dog"]
    np.testing.assert_array_equal(data.labels, [0, 0, 1, 1])
    # dog image 1 has value 11: (11 - mean_c) / 2 per channel.
    np.testing.assert_allclose(x[3, :, 0, 0], [(11 - 1) / 2, (11 - 2) / 2, (11 - 3) / 2])


def test_image_folder_nhwc_grayscale_and_resize(tmp_path):
    write_images(tmp_path, sizes=((20, 16), (10, 8)), mode="L")
    opts = ImageOptions(size=4, crop=4, layout="NHWC")  # shorter side -> 4: 5x4, then a 4x4 crop
    data = load_data(tmp_path, image_model([4, 4, 1]), opts)
    x = data.inputs["img"]
    assert x.shape == (4, 4, 4, 1)
    np.testing.assert_allclose(x[1], np.full((4, 4, 1), 1 / 255), rtol=1e-6)


def test_image_folder_errors(tmp_path):
    write_images(tmp_path, sizes=((12, 10), (14, 10)))
    with pytest.raises(DataError, match="different sizes"):
        load_data(tmp_path, image_model([3, 10, 12]))
    with pytest.raises(DataError, match="larger than the image"):
        load_data(tmp_path, image_model([3, 20, 20]), ImageOptions(crop=20))
    (tmp_path / "dog" / "broken.png").write_text("not an image")
    with pytest.raises(DataError, match="not a readable image"):
        load_data(tmp_path, image_model([3, 10, 10]), ImageOptions(crop=10))
    for bad in ({"layout": "CHW"}, {"size": 0}, {"std": (1.0, 0.0)}):
        with pytest.raises(DataError):
            ImageOptions(**bad)


def test_model_inputs_skips_initializers(rng):
    model = small_cnn(rng)
    model.graph.input.append(helper.make_tensor_value_info("fc.bias", TensorProto.FLOAT, [10]))
    assert [name for name, _, _ in model_inputs(model)] == ["X"]


def test_split_is_stratified():
    data = Dataset({"x": np.arange(100.0).reshape(100, 1)}, np.repeat(np.arange(4), 25))
    search, hold = data.split(0.2, seed=1)
    assert len(search) == 80 and len(hold) == 20
    assert np.bincount(hold.labels).tolist() == [5, 5, 5, 5]
    assert not set(search.inputs["x"][:, 0]) & set(hold.inputs["x"][:, 0])
    with pytest.raises(DataError):
        data.split(1.5)
