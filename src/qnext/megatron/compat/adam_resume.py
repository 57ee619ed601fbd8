"""Resuming a Megatron run with torch's Adam/AdamW (no Apex / Transformer Engine): the repairs that
megatron-core 0.19.2 needs around ``load_checkpoint``, and :func:`load_with_adam_state`, the one
function that applies them. The training entry wraps megatron's loader with it; the CPU resume test
(``tests/integration/test_megatron_optimizer_resume_cpu.py``) calls the same function, so removing a
repair from it fails that test.
"""
from __future__ import annotations

from typing import Any, Callable


def torch_optimizers(optimizer) -> list:
    """The torch.optim optimizers inside a megatron optimizer (chained or not)."""
    chained = getattr(optimizer, "chained_optimizers", None)
    wrappers = chained if chained is not None else [optimizer]
    return [w.optimizer for w in wrappers if getattr(w, "optimizer", None) is not None]


def prime_adam_states(optimizer) -> int:
    """Give every parameter of torch's Adam/AdamW inside ``optimizer`` an empty state (step 0, zero
    moments), as a fresh optimizer has after its first ``step`` call would create it; returns how
    many were primed.

    Why: without Apex or Transformer Engine, megatron-core 0.19.2's DistributedOptimizer builds the
    sharded state dict it loads *into* from ``torch.optim.Adam.state_dict()``, reading each
    parameter's ``step`` (``assert len(steps) == 1`` in ``DistributedOptimizer.state_dict``). A fresh
    optimizer has no state yet, so resuming a TE-free run stopped there. The primed values are those
    torch would create at the first step (so training from them is unchanged) and are overwritten by
    the checkpoint's on load."""
    import torch

    n = 0
    for opt in torch_optimizers(optimizer):
        if not isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in opt.param_groups:
            on_device = group.get("capturable") or group.get("fused")  # where torch keeps ``step``
            for p in group["params"]:
                if len(opt.state[p]) == 0:
                    opt.state[p] = {"step": torch.tensor(0.0, dtype=torch.float32, device=p.device if on_device else None),
                                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
                    n += 1
    return n


def unshare_adam_steps(optimizer) -> int:
    """Give every parameter of torch's Adam/AdamW inside ``optimizer`` its own ``step`` tensor;
    returns how many were shared before.

    Why: megatron-core 0.19.2's ``DistributedOptimizer.load_state_dict`` without Apex/TE puts *one*
    step tensor into every parameter's state (``s["step"] = step``), and torch's Adam increments each
    parameter's step in place, so after a resume the shared counter advanced once per parameter at
    every step: bias correction then used a step count far beyond k + 1 and the updates after a
    resume differed from the uninterrupted run's (measured on an H200: the loss right after resuming
    matched, the next ones did not; benchmarks/results/megatron_train_gpu/README.md). megatron's own CPU-offload branch clones
    the step per parameter; this does the same for the plain torch optimizers."""
    n = 0
    for opt in torch_optimizers(optimizer):
        seen: set[int] = set()
        for state in opt.state.values():
            step = state.get("step")
            if step is None or not hasattr(step, "detach"):
                continue
            if id(step) in seen:
                state["step"] = step.detach().clone()
                n += 1
            seen.add(id(state["step"]))
    return n


def use_fused_adam(optimizer) -> int:
    """Switch torch's Adam/AdamW inside ``optimizer`` to its fused implementation (``fused=True``):
    one kernel per step and no temporaries, where the default foreach path allocates the square root of
    every second moment at once (4 B per weight; the full 4-layer proxy ran out of memory there on an
    H200). Step counters move to the parameters' device as fused Adam wants them. Returns the number of
    fused param groups (0 when megatron uses TE/Apex FusedAdam, or for a host-offloaded optimizer).

    torch reads ``fused`` from the param group at every step, and a checkpoint's param groups carry
    the flag they were saved with, so this runs again after a load."""
    import torch

    n = 0
    for opt in torch_optimizers(optimizer):
        if not isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in opt.param_groups:
            params = group["params"]
            if not params or group.get("differentiable") or not all(p.is_floating_point() for p in params):
                continue
            if not group.get("fused"):
                group["fused"], group["foreach"], group["capturable"] = True, False, False
            n += 1
            for p in params:
                state = opt.state.get(p)
                step = state.get("step") if state else None
                if step is not None and (not torch.is_tensor(step) or step.device != p.device):
                    state["step"] = torch.as_tensor(float(step), dtype=torch.float32, device=p.device).clone()
    return n


def adam_state_report(optimizer) -> dict[str, Any]:
    """What torch's Adam holds after a load: the distinct ``step`` values, and the mean |exp_avg| (zero
    would mean the moments were not restored)."""
    steps: set[float] = set()
    total, count = 0.0, 0
    for opt in torch_optimizers(optimizer):
        for state in opt.state.values():
            if "step" in state:
                steps.add(float(state["step"]))
            m = state.get("exp_avg")
            if m is not None:
                total += float(m.float().abs().sum())
                count += m.numel()
    return {"steps": sorted(steps), "exp_avg_abs_mean": total / count if count else None}


def restore_adam_steps(optimizer, iteration: int) -> int:
    """Set every torch Adam ``step`` to ``iteration`` (its own tensor each); returns how many changed.

    Why: in bf16 every megatron iteration is exactly one optimizer step (no loss scaler, no skipped
    updates), so after resuming at iteration k Adam's bias correction must use k. The value megatron
    restores through its param-group ``step`` was found wrong after a resume on the GPU (the update right
    after the resume differed from the uninterrupted run's), so it is set from the checkpoint's
    iteration, which megatron restores exactly."""
    import torch

    n = 0
    for opt in torch_optimizers(optimizer):
        for state in opt.state.values():
            step = state.get("step")
            if step is None:
                continue
            if not torch.is_tensor(step) or float(step) != float(iteration):
                n += 1
            device = step.device if torch.is_tensor(step) else None
            state["step"] = torch.tensor(float(iteration), dtype=torch.float32, device=device)
    return n


def load_with_adam_state(load: Callable, model, optimizer, *args: Any, resuming: bool, fused: bool,
                         load_optim: bool = True, fp16: bool = False, say: Callable[[str], None] = print,
                         **kwargs: Any):
    """``load(model, optimizer, *args, **kwargs)`` (megatron's ``load_checkpoint``, returning
    ``(iteration, ...)``) with torch Adam's state made right before and after:

    - fused AdamW switched on before the load (``fused``) and again after it (the checkpoint's param
      groups bring their own flag);
    - when ``resuming``: every parameter's state primed before the load (:func:`prime_adam_states`),
      and after it the step counts set from the iteration (bf16: :func:`restore_adam_steps`) or, with
      fp16's possible skipped updates, kept but unshared (:func:`unshare_adam_steps`).
    """
    if fused and optimizer is not None:
        use_fused_adam(optimizer)
    if resuming and optimizer is not None:
        prime_adam_states(optimizer)
    result = load(model, optimizer, *args, **kwargs)
    if resuming and optimizer is not None and load_optim:
        iteration = int(result[0])
        seen = adam_state_report(optimizer)
        if fp16:  # skipped updates possible: keep the loaded counts, one tensor each
            changed = 0
            unshare_adam_steps(optimizer)
        else:  # bf16: one Adam step per iteration; a fresh step tensor per state
            changed = restore_adam_steps(optimizer, iteration)
        if fused:
            use_fused_adam(optimizer)
        m = seen["exp_avg_abs_mean"]
        say(f"resume: Adam state loaded at iteration {iteration}: step values {seen['steps']}, "
            f"mean |exp_avg| {'n/a' if m is None else f'{m:.3e}'}"
            + (f"; step set to {iteration} in {changed} parameter states" if changed else ""))
    return result
