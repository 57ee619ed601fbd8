"""Every workaround for megatron-core 0.19.2 in one place, one module per concern.

Installed explicitly by the entry points (``install_all()``: the Megatron training entry, the layout
check, ``qnext.megatron.parallel.initialize_parallel`` for scripts and tests); each replacement is
idempotent and marked, and ``QNEXT_MEGATRON_FIXES=0`` turns the run-time replacements off. A
megatron-core other than :data:`PINNED_MEGATRON_CORE` is warned about once: each module names behaviour
of that version.

- ``router_token_count``: the router aux-loss gradient under TP/CP (Megatron-LM pull request 7481).
- ``thd_rope``: RoPE of a packed row in one pass (TE-free megatron loops over its sequences).
- ``adam_resume``: five repairs of Adam's state around megatron's checkpoint load (step counters
  shared or lost, lazily created states) and ``load_with_adam_state``, the load the entry uses.
- ``initialize``: megatron.training's initialisation without its dataset-helper build step.
- ``cpu``: building and running megatron modules without a GPU (tests, manifests, the layout check).
- ``step_reductions``: train_step's post-optimizer agreement across the model-parallel group without a
  device round trip when the group is one rank (three host-device syncs per step fewer).
- ``grad_norm``: the TE-free gradient norm without a device read per gradient, and a non-finite norm fatal
  before the update (which lets the entry drop DDP's per-bucket NaN/Inf reads when clipping).
- ``grad_accum``: gradient accumulation fusion without Apex (a torch stand-in for its extension), installed
  by the model provider when ``QNEXT_GRAD_ACCUM_FUSION=1``.
- ``main_grad``: DDP's per-micro-batch ``main_grad += grad`` as one compiled kernel (CUDA, bf16 into fp32).
"""
from __future__ import annotations

from ._patching import PINNED_MEGATRON_CORE, check_megatron_core_version, install  # noqa: F401
from .grad_norm import install_grad_norm_fix
from .main_grad import install_main_grad_add
from .router_token_count import install_router_token_count_fix
from .step_reductions import install_step_reductions_fix
from .thd_rope import install_thd_rope_vectorized


def install_all() -> None:
    """Every run-time replacement (each idempotent); warns once on another megatron-core."""
    check_megatron_core_version()
    install_router_token_count_fix()
    install_thd_rope_vectorized()
    install_step_reductions_fix()
    install_grad_norm_fix()
    install_main_grad_add()
