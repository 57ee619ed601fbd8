"""qnext: fine-tuning recipes for Qwen3-Next (hybrid Gated DeltaNet + gated attention MoE)."""

__version__ = "0.1.0"
