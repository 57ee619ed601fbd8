"""Per-architecture data: dims read from the HF config, the HF on-disk tensors, and the weight map
to Megatron's torch_dist keys (``qwen3_next.py``); the rule/transform vocabulary (``weight_map.py``)."""
