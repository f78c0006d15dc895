"""check_onnx: a good hand-built FP8 Q/DQ Linear passes; each broken TensorRT rule is caught and named."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fp8kit.export import RULES, check_onnx

FP16 = TensorProto.FLOAT16
K, N = 16, 8


def fp8_tensor(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=ml_dtypes.float8_e4m3fn), name)


def build(
    *,
    zp_dtype=ml_dtypes.float8_e4m3fn,
    with_zp: bool = True,
    act_scale=0.05,
    act_scale_dtype=np.float16,
    w_scale=None,
    w_axis: int | None = None,
    between: str | None = None,
    opset: int = 19,
    ir_version: int = 10,
    weight_dtype=ml_dtypes.float8_e4m3fn,
    fp8_cast: bool = False,
    saturate: int | None = 1,
    extra_nodes=(),
) -> onnx.ModelProto:
    """x[B,K] fp16 -> Q -> DQ -> MatMul <- [between] <- DQ(w_scale, axis) <- W[K,N] -> Add bias -> y."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((K, N)).astype(np.float32)
    w_scale = np.float16(0.01) if w_scale is None else w_scale
    inits = [
        numpy_helper.from_array(np.asarray(act_scale, dtype=act_scale_dtype), "x_scale"),
        numpy_helper.from_array(np.asarray(w_scale), "w_scale"),
        numpy_helper.from_array(np.zeros(N, np.float16), "bias"),
    ]
    inits.append(fp8_tensor("W", w) if weight_dtype is ml_dtypes.float8_e4m3fn else numpy_helper.from_array(w.astype(weight_dtype), "W"))
    if with_zp:
        inits.append(numpy_helper.from_array(np.zeros((), dtype=zp_dtype), "zp"))
    w_scale_arr = np.asarray(w_scale)
    if with_zp and w_scale_arr.ndim == 1:
        inits.append(fp8_tensor("w_zp", np.zeros(w_scale_arr.shape)))
    zp_in = ["zp"] if with_zp else []
    q_attrs = {} if saturate is None else {"saturate": saturate}
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", *zp_in], ["xq"], name="q_x", **q_attrs)]
    nodes.append(helper.make_node("DequantizeLinear", ["xq", "x_scale", *zp_in], ["xdq"], name="dq_x"))
    w_zp = (["w_zp"] if w_scale_arr.ndim == 1 else ["zp"]) if with_zp else []
    dq_attrs = {} if w_axis is None else {"axis": w_axis}
    w_src = "W"
    if fp8_cast:
        nodes.append(helper.make_node("Cast", ["W"], ["W_cast"], name="cast_w", to=TensorProto.FLOAT8E4M3FN))
        w_src = "W_cast"
    nodes.append(helper.make_node("DequantizeLinear", [w_src, "w_scale", *w_zp], ["wdq"], name="dq_w", **dq_attrs))
    w_in = "wdq"
    if between == "Transpose":
        nodes.append(helper.make_node("Transpose", ["wdq"], ["wdq_t"], name="transpose_w", perm=[0, 1]))
        w_in = "wdq_t"
    elif between == "Cast":
        nodes.append(helper.make_node("Cast", ["wdq"], ["wdq_c"], name="cast_w16", to=FP16))
        w_in = "wdq_c"
    nodes.append(helper.make_node("MatMul", ["xdq", w_in], ["mm"], name="gemm"))
    nodes.append(helper.make_node("Add", ["mm", "bias"], ["y"], name="add_bias"))
    nodes.extend(extra_nodes)
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", FP16, ["batch", K])],
        [helper.make_tensor_value_info("y", FP16, ["batch", N])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model


def rules(model: onnx.ModelProto) -> set[str]:
    return {v.rule for v in check_onnx(model)}


def test_good_graph_passes_per_tensor_and_per_channel():
    assert check_onnx(build()) == []
    assert check_onnx(build(w_scale=np.full(N, 0.01, np.float16), w_axis=1)) == []


def test_good_graph_runs_in_onnxruntime():
    import onnxruntime as ort

    model = build(w_scale=np.full(N, 0.01, np.float16), w_axis=1)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": np.ones((2, K), np.float16)})[0]
    assert y.shape == (2, N) and np.isfinite(y).all()


@pytest.mark.parametrize(
    ("kwargs", "rule"),
    [
        pytest.param({"with_zp": False}, "q-zero-point", id="missing-fp8-zero-point"),
        pytest.param({"zp_dtype": np.int8}, "q-zero-point", id="int8-zero-point"),
        pytest.param({"act_scale_dtype": np.float32, "extra_nodes": ()}, "onnx-checker", id="fp32-act-scale-fp16-graph"),
        pytest.param({"w_scale": np.float32(0.01), "between": "Cast"}, "scale-dtype", id="fp32-weight-scale-fp16-graph"),
        pytest.param({"between": "Transpose"}, "dq-feeds-gemm", id="transpose-between-dq-and-matmul"),
        pytest.param({"act_scale": 0.0}, "scale-constant", id="zero-scale"),
        pytest.param({"act_scale": -0.5}, "scale-constant", id="negative-scale"),
        pytest.param({"w_scale": np.full(N, 0.01, np.float16)}, "axis", id="per-channel-missing-axis"),
        pytest.param({"w_scale": np.full(N, 0.01, np.float16), "w_axis": 0}, "axis", id="per-channel-wrong-axis"),
        pytest.param({"opset": 17}, "opset", id="opset-17"),
        pytest.param({"ir_version": 8}, "ir-version", id="ir-version-8"),
        pytest.param({"weight_dtype": np.float16, "fp8_cast": True}, "no-fp8-cast", id="fp8-cast"),
        pytest.param({"weight_dtype": np.float16}, "weight-fp8", id="fp16-weight-initializer"),
        pytest.param({"saturate": 0}, "q-saturate", id="saturate-0"),
    ],
)
def test_each_broken_rule_is_caught(kwargs, rule):
    violations = check_onnx(build(**kwargs))
    assert rule in {v.rule for v in violations}, violations
    hit = next(v for v in violations if v.rule == rule)
    assert hit.node and hit.message and rule in str(hit)
    assert rule in RULES


def test_fp32_activation_scale_in_fp16_graph_is_named_by_the_scale_rule():
    # ONNX itself rejects Q(x fp16, scale fp32); the scale rule must name the node anyway.
    violations = check_onnx(build(act_scale_dtype=np.float32))
    hits = [v for v in violations if v.rule == "scale-dtype"]
    assert hits and hits[0].node == "QuantizeLinear 'q_x'" and "FLOAT in a FLOAT16 graph" in hits[0].message


def test_transpose_violation_names_the_node():
    hit = next(v for v in check_onnx(build(between="Transpose")) if v.rule == "dq-feeds-gemm")
    assert hit.node == "DequantizeLinear 'dq_w'" and "Transpose" in hit.message


def test_dynamic_quantize_linear_and_one_sided_fp8_gemm():
    model = build()
    # Make the MatMul read x unquantized on one side: a one-sided FP8 GEMM.
    for node in model.graph.node:
        if node.name == "gemm":
            node.input[0] = "x"
        if node.name == "dq_x":
            node.output[0] = "unused"
    model.graph.node.append(helper.make_node("DynamicQuantizeLinear", ["x"], ["dq_y", "dq_s", "dq_z"], name="dyn"))
    found = rules(model)
    assert {"gemm-both-fp8", "no-dynamic-quant"} <= found


def test_check_reads_a_path(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(build(opset=17), path)
    assert "opset" in {v.rule for v in check_onnx(path)}
    with pytest.raises(FileNotFoundError):
        check_onnx(tmp_path / "missing.onnx")
