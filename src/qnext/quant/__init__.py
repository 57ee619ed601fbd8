"""Quantized frozen base weights for LoRA (FP8 e4m3 today; see ``fp8``)."""
