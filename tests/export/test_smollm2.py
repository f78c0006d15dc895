"""The real SmolLM2-135M (embedded GGUF) through `python -m export default OUT.onnx`: one slow test."""

from __future__ import annotations

import re

import onnx
import pytest

from fp8kit.export import check_onnx
from fp8kit.export.__main__ import main


@pytest.mark.slow
def test_smollm2_default_export(tmp_path, capsys):
    from fp8kit.core.errors import ModelLoadError
    from fp8kit.core.models import default_gguf_path

    try:
        default_gguf_path()
    except ModelLoadError as exc:
        pytest.skip(str(exc))
    out = tmp_path / "default.onnx"
    code = main(["default", str(out), "--num-samples", "4", "--seq-len", "128",
                 "--validate-samples", "8", "--validate-seq-len", "16"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert check_onnx(out) == []
    assert "210 of 211 Linear layers quantized; kept in fp16: lm_head" in text  # 30 x (q,k,v,o,gate,up,down)
    ratio = float(re.search(r"for an fp16 export of the same graph \((\d\.\d\d)x\)", text).group(1))
    # 106M Linear parameters at 1 byte + the 28M-parameter tied embedding at 2 bytes, vs 2 bytes each
    assert 0.58 <= ratio <= 0.68, text
    model = onnx.load(str(out), load_external_data=False)
    fp8 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT8E4M3FN and len(t.dims) == 2]
    assert len(fp8) == 210
    assert sum(t.dims[0] * t.dims[1] for t in fp8) == 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536)
    embed = [t for t in model.graph.initializer if list(t.dims) in ([49152, 576], [576, 49152])]
    assert len(embed) == 1  # tied embedding / lm_head stored once
    assert "parity (ORT" in text and "level=all" in text
    assert "trtexec --onnx=" in text and "--maxShapes=input_ids:32x2048,attention_mask:32x2048" in text
