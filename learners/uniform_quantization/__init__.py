"""Uniform quantization: int8 quantization-aware training / post-training int8, shipped as int8 TFLite."""
