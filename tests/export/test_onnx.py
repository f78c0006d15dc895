"""export_onnx: the graph has the TensorRT FP8 pattern, one byte per quantized weight, and clear errors."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper
from torch import nn

from fp8kit.core import QuantConfig
from fp8kit.core.linear import FP8Linear
from fp8kit.export import ExportError, check_onnx, export_onnx
from fp8kit.export.onnx import fp8_layers

FP8 = TensorProto.FLOAT8E4M3FN


def _attrs(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _graph(path):
    model = onnx.load(str(path))
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: t for t in model.graph.initializer}
    return model, producers, inits


@pytest.mark.parametrize("weight", ["tensor", "channel"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_mlp_graph_is_the_tensorrt_pattern(tmp_path, weight, dtype, models):
    model = models.quantized_mlp(weight)
    path = tmp_path / "mlp.onnx"
    result = export_onnx(model, path, example_inputs=(torch.randn(4, 32),), dtype=dtype)
    assert check_onnx(path) == []
    onnx_model, producers, inits = _graph(path)
    elem = TensorProto.FLOAT16 if dtype == torch.float16 else TensorProto.FLOAT
    assert onnx_model.ir_version == 10
    assert [o.version for o in onnx_model.opset_import if o.domain == ""] == [19]
    matmuls = [n for n in onnx_model.graph.node if n.op_type == "MatMul"]
    assert len(matmuls) == 3 == len(result.quantized_layers)
    for layer_name, mm in zip(["0", "2", "4"], matmuls):
        x_dq, w_dq = (producers[i] for i in mm.input)
        assert x_dq.op_type == w_dq.op_type == "DequantizeLinear"  # DQ feeds MatMul directly
        q = producers[x_dq.input[0]]
        assert q.op_type == "QuantizeLinear" and _attrs(q)["saturate"] == 1
        zp = inits[q.input[2]]
        assert zp.data_type == FP8 and numpy_helper.to_array(zp).astype(np.float32) == 0
        x_scale = inits[q.input[1]]
        assert x_scale.data_type == elem and list(x_scale.dims) == []
        expected_scale = float(fp8_layers(model)[layer_name].input_scale)
        assert numpy_helper.to_array(x_scale).item() == pytest.approx(expected_scale, rel=1e-3)
        weight_init = inits[w_dq.input[0]]
        linear = fp8_layers(model)[layer_name]
        assert weight_init.data_type == FP8
        assert list(weight_init.dims) == [linear.in_features, linear.out_features]  # pre-transposed [K, N]
        w_onnx = numpy_helper.to_array(weight_init).astype(np.float32)
        assert np.array_equal(w_onnx, linear.weight.float().t().numpy())  # the same FP8 codes
        w_scale = inits[w_dq.input[1]]
        assert w_scale.data_type == elem
        if weight == "channel":
            assert list(w_scale.dims) == [linear.out_features] and _attrs(w_dq)["axis"] == 1
        else:
            assert list(w_scale.dims) == [] and "axis" not in _attrs(w_dq)
    ops = collections.Counter(n.op_type for n in onnx_model.graph.node)
    assert ops["QuantizeLinear"] == 3 and ops["DequantizeLinear"] == 6
    assert ops["Transpose"] == 0 and ops["Cast"] == 0
    # one byte per quantized weight, no full-precision copy of it anywhere
    fp8_params = sum(numpy_helper.to_array(t).size for t in onnx_model.graph.initializer if t.data_type == FP8 and len(t.dims) == 2)
    assert fp8_params == 32 * 64 + 64 * 48 + 48 * 16
    big_float = [t.name for t in onnx_model.graph.initializer if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16) and len(t.dims) == 2]
    assert big_float == []
    assert [i.name for i in onnx_model.graph.input] == ["input"]
    assert onnx_model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_llama_graph_inputs_outputs_and_sizes(tmp_path, models):
    model = models.quantized_llama("tensor")
    path = tmp_path / "llama.onnx"
    result = export_onnx(model, path)  # fp16 default
    assert check_onnx(path) == []
    onnx_model, producers, inits = _graph(path)
    assert [i.name for i in onnx_model.graph.input] == ["input_ids", "attention_mask"]
    for inp in onnx_model.graph.input:
        assert [d.dim_param for d in inp.type.tensor_type.shape.dim] == ["batch", "seq"]
    out = onnx_model.graph.output[0]
    assert out.name == "logits" and out.type.tensor_type.elem_type == TensorProto.FLOAT16
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["batch", "seq", 256]
    assert len(result.quantized_layers) == 14  # 2 layers x (q, k, v, o, gate, up, down); lm_head ignored
    fp8_gemms = [
        n for n in onnx_model.graph.node
        if n.op_type == "MatMul" and all(i in producers and producers[i].op_type == "DequantizeLinear" for i in n.input)
    ]
    assert len(fp8_gemms) == 14
    # q/k/v (and gate/up) read the same input with the same calibrated scale: one shared Q -> DQ
    n_q = sum(n.op_type == "QuantizeLinear" for n in onnx_model.graph.node)
    assert n_q == 2 * 4
    # quantized weights: exactly one FP8 copy; embedding / lm_head stay fp16
    fp8_params = sum(m.weight.numel() for m in fp8_layers(model).values())
    stored_fp8 = sum(numpy_helper.to_array(t).size for t in onnx_model.graph.initializer if t.data_type == FP8 and len(t.dims) == 2)
    assert stored_fp8 == fp8_params
    shapes_of_quantized = {(m.in_features, m.out_features) for m in fp8_layers(model).values()} | {
        (m.out_features, m.in_features) for m in fp8_layers(model).values()
    }
    float_2d = [tuple(t.dims) for t in onnx_model.graph.initializer if t.data_type == TensorProto.FLOAT16 and len(t.dims) == 2]
    assert not set(float_2d) & shapes_of_quantized, float_2d
    assert sorted(float_2d) == [(64, 256), (256, 64)]  # lm_head (transposed) and embedding
    assert 0.0 < result.size_ratio and result.fp16_bytes > 0


def test_export_shows_no_dependency_noise(tmp_path, models, caplog, recwarn):
    """torch.onnx's known irrelevant messages (axis-name merges, torchvision registry, pytree deprecation,
    onnxscript / onnx_ir pass logs) are filtered around the export call; the export itself still logs."""
    import logging
    import warnings

    warnings.simplefilter("always")
    ours = logging.getLogger("fp8kit.export.onnx")
    state = (ours.disabled, ours.propagate)
    ours.disabled, ours.propagate = False, True  # whatever earlier in-process CLI calls did to logging
    try:
        with caplog.at_level(logging.INFO), caplog.at_level(logging.INFO, logger="fp8kit.export.onnx"):
            export_onnx(models.quantized_llama("tensor"), tmp_path / "m.onnx")
    finally:
        ours.disabled, ours.propagate = state
    noise = [str(w.message) for w in recwarn if "axis name" in str(w.message) or "LeafSpec" in str(w.message)]
    assert noise == []
    names = {r.name for r in caplog.records}
    assert not {n for n in names if n.startswith(("onnx_ir", "onnxscript", "torch.onnx"))}, names
    assert "fp8kit.export.onnx" in names  # our own INFO line is still there
    assert logging.getLogger("onnx_ir").level == logging.NOTSET  # levels restored after the call


def test_fp16_bytes_matches_a_real_fp16_export_of_the_unquantized_model(tmp_path, models):
    """fp16_bytes (floats counted at 2 bytes) agrees with the initializer bytes of a real fp16 export."""
    model = models.quantized_llama("tensor", seed=0)
    result = export_onnx(model, tmp_path / "q.onnx")
    plain = models.tiny_llama(0).half()

    class Wrap(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids, mask):
            return self.m(input_ids=ids, attention_mask=mask, use_cache=False).logits

    ids = torch.randint(0, 256, (2, 8))
    program = torch.onnx.export(Wrap(plain), (ids, torch.ones_like(ids)), dynamo=True, opset_version=19, optimize=True)
    fp16_init = sum(v.const_value.nbytes for v in program.model.graph.initializers.values() if v.const_value is not None)
    weights_fp16 = sum(2 * m.weight.numel() for m in fp8_layers(model).values())
    # ours counts the FP8 weights at 2 bytes and adds scales / zero points: within 2% of the fp16 export
    assert abs(result.fp16_bytes - fp16_init) / fp16_init < 0.02
    assert fp16_init > weights_fp16


def test_model_is_not_modified(tmp_path, models):
    model = models.quantized_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, tmp_path / "m.onnx", example_inputs=(torch.randn(2, 32),), dtype="fp16")
    assert all(isinstance(model[i], FP8Linear) for i in (0, 2, 4))
    after = model.state_dict()
    assert all(before[k].dtype == after[k].dtype and torch.equal(before[k].float(), after[k].float()) for k in before)


def test_errors_are_clear_and_leave_no_file(tmp_path, models):
    path = tmp_path / "x.onnx"
    x = (torch.randn(2, 32),)
    with pytest.raises(ExportError, match="no quantized .FP8Linear. layer.*fp8kit.core.quantize"):
        export_onnx(models.MLP(), path, example_inputs=x)
    dynamic = models.quantized_mlp()
    dynamic[2].input_scale = None
    with pytest.raises(ExportError, match=r"first: '2'.*dynamic activation scales.*calibrate_activations"):
        export_onnx(dynamic, path, example_inputs=x)
    with pytest.raises(ExportError, match="opset 17.*opset >= 19"):
        export_onnx(models.quantized_mlp(), path, example_inputs=x, opset=17)
    with pytest.raises(ExportError, match="bf16"):
        export_onnx(models.quantized_mlp(), path, example_inputs=x, dtype="bf16")
    with pytest.raises(ExportError, match="does not exist"):
        export_onnx(models.quantized_mlp(), tmp_path / "nope" / "x.onnx", example_inputs=x)
    assert list(tmp_path.iterdir()) == []
    path.write_text("old")
    with pytest.raises(ExportError, match="already exists.*overwrite"):
        export_onnx(models.quantized_mlp(), path, example_inputs=x)
    assert path.read_text() == "old"
    export_onnx(models.quantized_mlp(), path, example_inputs=x, overwrite=True)
    assert onnx.load(str(path)).graph.node
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.onnx"]  # no temp leftovers


def test_fp16_scale_underflow_is_an_error(tmp_path, models):
    model = models.quantized_mlp()
    model[0].weight_scale.fill_(1e-9)  # 0 in fp16
    with pytest.raises(ExportError, match=r"0\.weight_scale.*does not fit torch.float16.*--dtype fp32"):
        export_onnx(model, tmp_path / "m.onnx", example_inputs=(torch.randn(2, 32),))
    export_onnx(model, tmp_path / "m.onnx", example_inputs=(torch.randn(2, 32),), dtype="fp32")


def test_calibrate_activations_makes_a_dynamic_checkpoint_exportable(tmp_path, models):
    from fp8kit.core import quantize
    from fp8kit.export import calibrate_activations

    model = quantize(models.tiny_llama(0), QuantConfig(activation="dynamic"))
    assert all(m.input_scale is None for m in fp8_layers(model).values())
    static = models.quantized_llama("tensor", seed=0)  # same weights, calibrated at quantization time
    names = calibrate_activations(model, [s[None] for s in models.token_sequences(6, seed=100)])
    assert len(names) == 14 and model.fp8kit_config.activation == "static"
    for name, layer in fp8_layers(model).items():
        reference = fp8_layers(static)[name].input_scale
        if name.endswith(("q_proj", "k_proj", "v_proj")) and ".layers.0." in name:
            # the first projections read embedding + norm only: identical statistics
            assert torch.allclose(layer.input_scale, reference, rtol=1e-6)
        else:  # later inputs come through FP8 layers here, through full precision in `static`
            assert torch.allclose(layer.input_scale, reference, rtol=0.25)
    export_onnx(model, tmp_path / "m.onnx")
    assert check_onnx(tmp_path / "m.onnx") == []
