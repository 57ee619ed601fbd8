"""Megatron-core back end for Qwen3-Next.

- ``config``: HF config -> ``TransformerConfig`` + GPTModel arguments, parallel sizes.
- ``spec``: the hybrid layer spec; Transformer Engine modules when TE imports, a TE-free stack
  otherwise (``norm``, ``attention``, ``experts``), same checkpoint layout in both.
- ``model``: ``build_model`` / ``model_provider`` and torch_dist ``load_torch_dist`` / ``save_torch_dist``.
- ``parallel``: process groups for scripts and tests outside ``megatron.training``.
- ``args``: a recipe -> the ``megatron.training`` argument list (pure; parsed by megatron's parser).
- ``checkpoint``: fresh start from the converted checkpoint vs resume; checks; pruning.
- ``data``: the chat data module as Megatron micro-batches; ``forward_step`` and the masked loss.
- ``train``: the training entry (``python -m qnext.megatron.train``; launched by scripts/run-*.sh).

Submodules import megatron-core lazily where they can, so ``import qnext.megatron`` stays cheap.
"""
