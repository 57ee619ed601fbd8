"""MoE token dispatch without host synchronisation for layers whose experts all live on this GPU.

megatron-core's all-to-all dispatcher, at expert-parallel size 1, still permutes through a
[tokens, experts] mask, splits and re-concatenates the permuted tokens into one chunk per local
expert (512 chunks for Qwen3-Next, an identity at EP=1), and copies the per-expert token counts to
the host, which waits for the GPU in every MoE layer of every forward and recompute.

:class:`SortedTokenDispatcher` does the same job with a handful of kernels and no host copy:

1. the router's k chosen experts of each token (``topk`` of its 0/1 routing map; exactly k ones
   per row when dropless) are flattened to ``T * k`` (token, expert) pairs;
2. one stable ``argsort`` of the expert ids orders the pairs by expert, keeping token order within
   an expert (as megatron's permutation does); a scatter-add gives the tokens per expert, on the GPU,
   from which the experts' grouped GEMM takes its offsets;
3. tokens and their routing probabilities are gathered in that order;
4. combining puts the expert outputs back in (token, choice) order with the inverse permutation and
   sums each token's k outputs, in one reduction (fp32 accumulation, deterministic) rather than
   megatron's scatter-add into a bf16 buffer.

The gather of step 3 has a custom backward that uses the same inverse permutation and reduction, so
the backward is deterministic too (autograd's ``index_select`` backward would scatter-add the k
copies of a token with atomics).

It is used where it applies (expert-parallel and expert-tensor-parallel size 1, dropless routing,
TE-free experts, :func:`sorted_dispatch_applies`); everywhere else megatron's dispatcher runs.
``QNEXT_MOE_DISPATCH=megatron`` selects megatron's dispatcher everywhere (for comparisons);
``tests/unit/test_moe_dispatch.py`` checks the two against each other.
"""
from __future__ import annotations

import os

import torch

from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher

from .regather import mark_gathered

ENV = "QNEXT_MOE_DISPATCH"


def dispatch_mode() -> str:
    """``sorted`` (the default) or ``megatron``, from ``QNEXT_MOE_DISPATCH``."""
    from ..errors import UserError

    mode = os.environ.get(ENV, "sorted")
    if mode not in ("sorted", "megatron"):
        raise UserError(f"{ENV}={mode!r} is not a dispatch mode", hint="use sorted (the default) or megatron, or unset it")
    return mode


def sorted_dispatch_applies(config, pg_collection) -> bool:
    """Whether :class:`SortedTokenDispatcher` can replace megatron's dispatcher for this layer."""
    return (
        dispatch_mode() == "sorted"
        and pg_collection.ep.size() == 1
        and pg_collection.expt_tp.size() == 1
        and config.moe_expert_capacity_factor is None
        and not config.moe_pad_expert_input_to_capacity
        and not getattr(config, "moe_router_padding_for_quantization", False)
        and not config.moe_shared_expert_overlap
        and config.moe_latent_size is None
        and not config.moe_grouped_gemm  # TE's grouped MLP wants host counts
    )


class _GatherPairs(torch.autograd.Function):
    """``x[token_of]`` (the token of each expert-sorted pair) with a deterministic backward: the
    gradient rows go back to (token, choice) order through ``inverse`` and each token's k rows are
    summed in one reduction."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, token_of: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x.index_select(0, token_of)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return unsort_and_sum(grad, inverse, ctx.k), None, None, None


class _Permute(torch.autograd.Function):
    """``rows[index]`` for a permutation ``index`` whose inverse is ``inverse``: the backward is the gather
    ``grad[inverse]``, not autograd's ``index_select`` backward (a scatter-add with bf16 atomics, 0.7 ms
    per MoE layer and micro-batch of the proxy on an H200, 5.7 ms of its 120 ms LoRA step)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return rows.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def unsort_and_sum(rows: torch.Tensor, inverse: torch.Tensor, k: int, order: torch.Tensor | None = None) -> torch.Tensor:
    """[T*k, H] rows in expert-sorted order -> [T, H]: back to (token, choice) order, summed over the
    k choices (fp32 accumulation inside the reduction, one rounding). With ``order`` (the permutation
    ``inverse`` undoes) the backward of the reordering is a gather through it."""
    h = rows.shape[-1]
    back = rows.index_select(0, inverse) if order is None else _Permute.apply(rows, inverse, order)
    return back.view(-1, k, h).sum(dim=1)


class SortedTokenDispatcher(MoETokenDispatcher):
    """Dispatch/combine for experts that all live on this GPU (see the module docstring)."""

    def __init__(self, num_local_experts: int, local_expert_indices, config, pg_collection):
        super().__init__(config=config, pg_collection=pg_collection)
        if self.ep_size != 1 or self.tp_size != 1:
            raise ValueError("SortedTokenDispatcher needs expert-parallel and expert-tensor-parallel size 1")
        self.num_local_experts = num_local_experts
        self.num_experts = config.num_moe_experts
        self.topk = config.moe_router_topk
        self.routing_map = None

    def dispatch_preprocess(self, hidden_states: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor):
        self.hidden_shape = hidden_states.shape
        self.routing_map = routing_map
        x = hidden_states.reshape(-1, self.hidden_shape[-1])
        k = self.topk
        # the k chosen experts of each token: exactly k ones per row of the dropless routing map
        experts = routing_map.to(torch.uint8).topk(k, dim=1, sorted=False).indices
        flat = experts.reshape(-1)
        order = torch.argsort(flat, stable=True)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        self.inverse, self.order = inverse, order
        # per-expert counts by a scatter-add (CUDA's bincount reads the largest id on the host first)
        self.tokens_per_expert = torch.zeros(self.num_experts, dtype=torch.long, device=flat.device).scatter_add_(
            0, flat, torch.ones_like(flat))
        token_of = order // k
        # marked: the experts' fc1 saves (x, token_of) for its backward instead of these rows (qnext.megatron.regather)
        permuted = mark_gathered(_GatherPairs.apply(x, token_of, inverse, k), x, token_of,
                                 lambda src: _GatherPairs.apply(src, token_of, inverse, k))
        permuted_probs = _Permute.apply(probs.gather(1, experts).reshape(-1), order, inverse)
        return permuted, permuted_probs

    def token_dispatch(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        return hidden_states, probs  # every expert is local: nothing to send

    def dispatch_postprocess(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        counts, self.tokens_per_expert = self.tokens_per_expert, None
        return hidden_states, counts, probs

    def combine_preprocess(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states

    def token_combine(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states

    def combine_postprocess(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out = unsort_and_sum(hidden_states, self.inverse, self.topk, order=self.order)
        self.inverse = self.order = None
        return out.to(hidden_states.dtype).view(self.hidden_shape)


class QnextMoELayer(MoELayer):
    """megatron's ``MoELayer`` with :class:`SortedTokenDispatcher` where it applies; otherwise
    exactly megatron's layer (same parameters, same checkpoint keys)."""

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None, is_mtp_layer=False, name=None):
        super().__init__(config, submodules=submodules, layer_number=layer_number, pg_collection=pg_collection,
                         is_mtp_layer=is_mtp_layer, name=name)
        pgs = self.token_dispatcher.ep_group, self.token_dispatcher.tp_group
        if sorted_dispatch_applies(config, _Groups(*pgs)):
            self.token_dispatcher = SortedTokenDispatcher(self.num_local_experts, self.local_expert_indices,
                                                          config=config, pg_collection=_Groups(*pgs, tp_ep=None))


class _Groups:
    """The process groups :class:`MoETokenDispatcher` reads (ep, expt_tp, tp_ep)."""

    def __init__(self, ep, expt_tp, tp_ep=None):
        self.ep, self.expt_tp, self.tp_ep = ep, expt_tp, tp_ep
