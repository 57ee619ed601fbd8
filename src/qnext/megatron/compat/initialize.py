"""megatron.training's initialisation without the step that always fails with the PyPI wheel."""
from __future__ import annotations


def initialize_megatron_without_dataset_helpers(args) -> None:
    """``megatron.training.initialize_megatron`` without its last step.

    That step (``_compile_dependencies``) runs ``make`` in ``megatron/core/datasets`` on rank 0 and
    exits the process when it fails; the PyPI wheel of megatron-core 0.19.2 ships the compiled helper
    but no Makefile, so it always fails there. Our data module does not use megatron's datasets, so
    the rest is done here in the same order: logging and the rerun state machine (megatron's own
    function, stopped before process groups), process groups, seeds, the MoE aux-loss scale.
    """
    import torch
    from megatron.training import initialize as mi

    mi.initialize_megatron(skip_mpu_initialization=True)
    mi._initialize_distributed(None, None, None)
    mi._set_random_seed(args.seed, args.data_parallel_random_init, args.te_rng_tracker, args.inference_rng_tracker,
                        use_cudagraphable_rng=args.cuda_graph_impl != "none")
    if args.num_experts is not None:
        from megatron.core.transformer.moe.router import MoEAuxLossAutoScaler

        MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1, device=torch.cuda.current_device()))
