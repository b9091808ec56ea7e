"""Weight-only post-training quantization: `quantize(model_dir, output_dir, method=...)` (stage.py).

This package file imports nothing heavy: the CLI reads METHODS when it builds its parser, and importing
compressed-tensors (which pulls transformers and torchao) takes seconds and prints torchao's warnings."""

METHODS = ("int8", "int4", "int4-awq", "int4-gptq")
