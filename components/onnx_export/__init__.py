"""ONNX export: the decoder with its KV cache as graph inputs/outputs, checked against PyTorch.

wrapper.py   OnnxDecoder: the model's forward with past keys/values in and present ones out
export.py    export_onnx(model_dir, output_dir): export, copy config/tokenizer, parity check, metadata
runtime.py   OnnxDecoderSession: onnxruntime prefill / decode / greedy generation
"""

from lmforge.components.onnx_export.export import OnnxExportResult, export_onnx
from lmforge.components.onnx_export.runtime import OnnxDecoderSession

__all__ = ["OnnxDecoderSession", "OnnxExportResult", "export_onnx"]
