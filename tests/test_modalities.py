"""Modality extraction with known answers: translated patterns, planes, a real ONNX depth model."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from runtime.modalities import (DepthEstimator, ModalityError, WHEEL, depth_to_rgb, disparity_to_depth, flow_frames,
                                flow_to_rgb, normals_from_depth, normals_to_rgb, optical_flow, read_depth)


def _texture(h=96, w=128, seed=0):
    rng = np.random.default_rng(seed)
    import cv2
    noise = rng.integers(0, 255, (h // 4, w // 4, 3), dtype=np.uint8)
    return cv2.resize(noise, (w, h), interpolation=cv2.INTER_CUBIC)


@pytest.mark.parametrize("dx, dy", [(3, 0), (0, -2), (2, 2)])
def test_flow_of_a_translated_pattern(dx, dy):
    img = _texture(160, 200)
    moved = np.roll(img, (dy, dx), axis=(0, 1))
    flow = optical_flow(img, moved)
    inner = flow[20:-20, 20:-20].reshape(-1, 2)
    np.testing.assert_allclose(np.median(inner, axis=0), [dx, dy], atol=0.25)


def test_flow_colour_wheel_directions():
    right = np.zeros((4, 4, 2), np.float32)
    right[..., 0] = 1
    np.testing.assert_array_equal(flow_to_rgb(right)[0, 0], [255, 0, 0])  # rightward flow is red
    still = np.zeros((4, 4, 2), np.float32)
    assert (flow_to_rgb(still) == 255).all()  # no motion is white
    noise = np.random.default_rng(0).normal(0, 0.05, (4, 4, 2)).astype(np.float32)
    assert flow_to_rgb(noise).min() > 200  # sub-pixel noise is not stretched to full colour
    left = -right
    assert tuple(flow_to_rgb(left)[0, 0]) != (255, 0, 0) and len(WHEEL) == 55
    frames = np.stack([_texture(), _texture(seed=1)])
    assert flow_frames(frames, np.roll(frames, 2, axis=2)).shape == (2, 96, 128, 3)


def test_normals_of_planes():
    y, x = np.mgrid[0:50, 0:60].astype(np.float32)
    flat = normals_from_depth(np.full((50, 60), 7.0, np.float32))
    np.testing.assert_allclose(flat[..., 2], 1.0)
    tilted = normals_from_depth(0.5 * x + 2.0)  # depth grows to the right: the surface faces left
    expected = np.array([-0.5, 0.0, 1.0]) / np.linalg.norm([-0.5, 0.0, 1.0])
    np.testing.assert_allclose(tilted[10, 10], expected, atol=1e-6)
    rgb = normals_to_rgb(tilted)
    assert rgb.dtype == np.uint8 and rgb[10, 10, 0] < 128 and rgb[10, 10, 2] > 200


def test_depth_files_and_rendering(tmp_path):
    import cv2
    depth = np.linspace(0, 5, 40 * 30, dtype=np.float32).reshape(30, 40)
    np.save(tmp_path / "d.npy", depth)
    cv2.imwrite(str(tmp_path / "d.png"), (depth * 1000).astype(np.uint16))
    np.testing.assert_allclose(read_depth(tmp_path / "d.npy"), depth)
    np.testing.assert_allclose(read_depth(tmp_path / "d.png") / 1000, depth, atol=1e-3)
    rgb = depth_to_rgb(depth + 1)
    assert rgb.shape == (30, 40, 3) and rgb[0, 0, 0] == 255 and rgb[-1, -1, 0] == 0  # near is bright
    assert rgb[15, 20, 0] < 255 * 0.5  # inverse depth: the middle distance is darker than halfway
    assert depth_to_rgb(depth)[0, 0, 0] == 255  # zero depth (invalid) does not divide by zero
    bad = depth.copy()
    bad[0, 0] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(ModalityError, match="NaN"):
        read_depth(tmp_path / "nan.npy")
    cv2.imwrite(str(tmp_path / "colour.png"), np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ModalityError, match="single-channel"):
        read_depth(tmp_path / "colour.png")
    with pytest.raises(ModalityError, match="no such depth file"):
        read_depth(tmp_path / "missing.npy")


def test_onnx_depth_estimator(tmp_path):
    """A real ONNX graph honouring the contract: depth = 1 - mean of the channels, at 32x32."""
    node_mean = helper.make_node("ReduceMean", ["pixels"], ["mean"], axes=[1], keepdims=0)
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    node_sub = helper.make_node("Sub", ["one", "mean"], ["depth"])
    graph = helper.make_graph([node_mean, node_sub], "depth",
                              [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["n", 3, 32, 32])],
                              [helper.make_tensor_value_info("depth", TensorProto.FLOAT, ["n", 32, 32])],
                              initializer=[one])
    path = tmp_path / "depth.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    frames = np.zeros((2, 64, 80, 3), np.uint8)
    frames[1] = 255
    depth = DepthEstimator(path)(frames)
    assert depth.shape == (2, 64, 80)
    np.testing.assert_allclose(depth[0], 1.0, atol=1e-6)
    np.testing.assert_allclose(depth[1], 0.0, atol=1e-6)
    (tmp_path / "broken.onnx").write_bytes(b"nope")
    with pytest.raises(ModalityError, match="cannot load the depth model"):
        DepthEstimator(tmp_path / "broken.onnx")


def test_disparity_to_depth():
    """1 / d with d floored at 1e-3 of the map's maximum; rendering it gives back the normalised disparity."""
    d = np.array([[4.0, 2.0], [0.0, -1.0]], np.float32)
    np.testing.assert_allclose(disparity_to_depth(d), [[0.25, 0.5], [250.0, 250.0]])
    grey = depth_to_rgb(disparity_to_depth(np.linspace(0.5, 4, 8, dtype=np.float32).reshape(2, 4)))[..., 0]
    np.testing.assert_array_equal(grey.ravel(), ((np.linspace(0.5, 4, 8) - 0.5) / 3.5 * 255).round())
    np.testing.assert_array_equal(disparity_to_depth(np.zeros((3, 3), np.float32)), np.ones((3, 3)))
