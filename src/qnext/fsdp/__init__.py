"""The fallback training backend: the HF Qwen3-Next model + PEFT LoRA (or full training) sharded with
FSDP2, straight from an HF checkpoint (no conversion). Runs on GPUs (NCCL, bf16) and on CPU (gloo,
float32) for tests and the demo. Entry point: ``python -m qnext.fsdp.train`` / ``scripts/run-fsdp.sh``.
"""
