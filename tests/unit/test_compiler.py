"""Compiler: clear errors for bad models, exact folding, scale selection and reporting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import helper

from privmed.compiler.compile import compile_model
from privmed.errors import ModelError
from tests.protocol.onnx_models import build, rand

H = helper.make_node


def test_all_unsupported_ops_are_listed_at_once(tmp_path: Path) -> None:
    nodes = [H("Cos", ["x"], ["a"], name="c1"), H("Atan", ["a"], ["b"], name="a1"), H("Sin", ["b"], ["y"], name="s1")]
    p = build(tmp_path / "m.onnx", nodes, {}, [1, 4])
    with pytest.raises(ModelError) as err:
        compile_model(p)
    msg = str(err.value)
    assert "Atan, Cos, Sin" in msg and "c1" in msg and "a1" in msg and "s1" in msg


def test_softmax_inside_is_secure_and_a_final_one_stays_in_clear(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    nodes = [H("Softmax", ["x"], ["s"], name="mid"), H("MatMul", ["s", "w"], ["m"]), H("Softmax", ["m"], ["y"], axis=1)]
    plan, _ = compile_model(build(tmp_path / "m.onnx", nodes, {"w": rand(rng, 4, 2)}, [1, 4]))
    assert [n.op for n in plan.nodes] == ["input", "softmax", "trunc", "linear", "output"]
    assert plan.nodes[1].attrs["axis"] == 0 and plan.nodes[-1].attrs["post"] == {"kind": "softmax", "axis": 1}


def test_sigmoid_inside_becomes_an_approximation_and_a_final_one_stays_in_clear(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    nodes = [H("Sigmoid", ["x"], ["s"]), H("MatMul", ["s", "w"], ["m"]), H("Sigmoid", ["m"], ["y"])]
    plan, _ = compile_model(build(tmp_path / "m.onnx", nodes, {"w": rand(rng, 4, 2)}, [1, 4]))
    assert [n.op for n in plan.nodes] == ["input", "approx", "trunc", "linear", "output"]
    assert plan.nodes[1].attrs["fn"] == "sigmoid" and plan.nodes[-1].attrs["post"]["kind"] == "sigmoid"


def test_missing_and_corrupt_model_files(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        compile_model(tmp_path / "nope.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(np.random.default_rng(0).bytes(4000))
    with pytest.raises(ModelError, match="bad.onnx: not a readable ONNX model"):
        compile_model(bad)


def test_scale_is_lowered_when_activations_are_large(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    p = build(tmp_path / "m.onnx", [H("MatMul", ["x", "w"], ["y"])], {"w": rand(rng, 8, 3)}, [1, 8])
    small, _ = compile_model(p, calibration=np.ones((1, 8)))
    big, _ = compile_model(p, calibration=np.full((1, 8), 2.0**28))
    assert small.frac_bits == 16
    assert big.frac_bits < 16 and big.report["frac_bits_limited_by"]
    assert big.report["headroom_bits"] >= 4  # the margin is kept


def test_plan_is_public_json_without_weights(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    w = rand(rng, 8, 3)
    p = build(tmp_path / "m.onnx", [H("MatMul", ["x", "w"], ["y"])], {"w": w}, [1, 8])
    plan, weights = compile_model(p)
    text = plan.to_json()
    assert "w_shape" in text and str(float(w[0, 0]))[:8] not in text
    assert set(weights.weight) == {n.id for n in plan.nodes if n.op == "linear"}


def test_supported_ops_are_the_lowerings_own_and_the_upfront_check_agrees(tmp_path) -> None:
    """The up-front check and the lowering cannot disagree: one list, derived from the Lowerer."""
    import onnx
    from onnx import TensorProto, helper

    from privmed.compiler.compile import compile_model
    from privmed.compiler.lower import SECRET_OPS, Lowerer
    from privmed.errors import ModelError
    from privmed.runtime.launch import check_input

    assert SECRET_OPS == {name[3:] for name in dir(Lowerer) if name.startswith("op_")}
    assert "Upsample" not in SECRET_OPS  # listed before but never lowered
    # an op refused in context (Resize is lowered, its tf_crop_and_resize coordinates are not)
    # is refused by the up-front check, before any party starts
    scales = helper.make_tensor("sc", TensorProto.FLOAT, [4], [1.0, 1.0, 2.0, 2.0])
    nodes = [helper.make_node("Resize", ["x", "", "sc"], ["r"], mode="cubic", name="up",
                                  coordinate_transformation_mode="tf_crop_and_resize"), helper.make_node("Relu", ["r"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 8, 8])], [scales])
    path = tmp_path / "crop.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(ModelError, match=r"crop\.onnx: node up: coordinate_transformation_mode 'tf_crop_and_resize' is not supported"):
        check_input(path, np.zeros((1, 1, 4, 4), np.float32))
    with pytest.raises(ModelError, match="'tf_crop_and_resize' is not supported"):
        compile_model(path)


def test_mod_on_shapes_folds_with_onnx_sign_rules() -> None:
    """SwinUNETR computes its window padding with Mod on shapes (folded at compile time)."""
    from privmed.compiler.constfold import evaluate

    a, b = np.array([-7, 7, -7]), np.array([3, 3, -3])
    np.testing.assert_array_equal(evaluate("Mod", [a, b], {})[0], [2, 1, -1])  # sign of the divisor
    np.testing.assert_array_equal(evaluate("Mod", [a, b], {"fmod": 1})[0], [-1, 1, -1])  # sign of the dividend


def test_scatternd_and_not_fold_like_onnx() -> None:
    """SwinUNETR builds its shifted-window mask with ScatterND and Not on shapes."""
    from privmed.compiler.constfold import evaluate

    data = np.zeros((2, 3))
    out = evaluate("ScatterND", [data, np.array([[0, 1], [1, 2]]), np.array([5.0, 7.0])], {})[0]
    np.testing.assert_array_equal(out, [[0, 5, 0], [0, 0, 7]])
    assert not data.any()  # the input constant is not modified
    rows = evaluate("ScatterND", [data, np.array([[1]]), np.array([[1.0, 2.0, 3.0]])], {})[0]
    np.testing.assert_array_equal(rows, [[0, 0, 0], [1, 2, 3]])
    np.testing.assert_array_equal(evaluate("Not", [np.array([True, False])], {})[0], [False, True])
    with pytest.raises(ValueError, match="reduction"):
        evaluate("ScatterND", [data, np.array([[0, 0]]), np.array([1.0])], {"reduction": "add"})
