"""Checkpoint I/O in the formats vLLM reads (REFERENCE §3), written atomically, read without pickles.

Layout of a checkpoint directory:
    config.json         the model's config + ``quantization_config`` (one schema per format)
    model.safetensors   or model-0000i-of-0000n.safetensors + model.safetensors.index.json
    tokenizer files     when a tokenizer is given

Modules: `formats` (the dispatch) over one module per format (`fp8`: AutoFP8 / vLLM; `compressed_tensors`:
llm-compressor's "float-quantized"), `writer` (atomic directory, safetensors writer, shards), `save`, `load`.
`load_quantized` reads both formats, including checkpoints of AutoFP8 and llm-compressor; schemes FP8Linear
cannot run (int, group / block strategies, asymmetric, packed formats) are refused by name.
"""

from ._schema import FORMAT_VERSION
from .formats import DEFAULT_FORMAT, FORMATS, check_format, format_readers, kv_scale_shape, layer_tensors, parse_quantization_config, quantization_config_dict
from .load import build_meta_model, load_quantized, read_quantization_config
from .save import save_hf, save_quantized
from .writer import CONFIG_NAME, WEIGHTS_NAME, SafetensorsWriter, atomic_directory, shard_names, write_index

__all__ = [
    "FORMAT_VERSION",
    "FORMATS",
    "DEFAULT_FORMAT",
    "format_readers",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "check_format",
    "save_quantized",
    "save_hf",
    "load_quantized",
    "read_quantization_config",
    "parse_quantization_config",
    "quantization_config_dict",
    "layer_tensors",
    "kv_scale_shape",
    "atomic_directory",
    "build_meta_model",
    "SafetensorsWriter",
    "shard_names",
    "write_index",
]
