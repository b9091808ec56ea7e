"""Weight-only post-training quantization: `quantize(model_dir, output_dir, method=...)` (stage.py)."""
