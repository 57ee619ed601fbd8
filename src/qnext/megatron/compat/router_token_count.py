"""The router load-balancing (aux) loss gradient under tensor or context parallelism
(upstream: Megatron-LM pull request 7481).

With ``--calculate-per-token-loss`` and a padding mask (the Megatron entry passes one with every batch),
megatron-core 0.19.2's router multiplies each rank's share of the aux loss by ``local_num_tokens *
tp_cp_size``, and takes ``local_num_tokens`` from ``get_tokens_per_expert_and_token_count``. That
function all-reduces its per-expert count *in place* before it reads the local count from the same
buffer, so ``local_num_tokens`` is the group's total: every rank's aux-loss gradient comes out
``tp_cp_size`` times too large. ``python -m qnext.megatron.layout_check`` measured it on the tiny model:
at TP2 with sequence parallelism the router weights' aux-loss gradient is exactly 2x the single-rank
one, all other gradients agree (the upstream report is Megatron-LM pull request 7481).

Even with the count read correctly (as upstream intends), ``local_num_tokens * tp_cp_size`` equals the
group's total only when the valid tokens are split evenly between the ranks, which padding at the end
of a sequence makes false (at TP2 the first half of a short chat holds all its tokens). The multiplier
that makes the step independent of the layout is the group's total valid-token count: each rank's
share of the aux loss, summed over the group, is then weighted exactly as on one rank. So the wrapper
returns ``total / group size`` as the local count, which megatron multiplies back by the group size.
qnext configures ``moe_router_load_balancing_type='aux_loss'`` only, the path this was measured on
(``tests/integration/test_megatron_grad_layouts.py``); the sequence-wise and global aux losses, which
call the same function with other groups, are not used here and were not checked.
"""
from __future__ import annotations

import functools

from ._patching import install


def _router_token_count(original):
    """megatron's ``get_tokens_per_expert_and_token_count`` with the group's total as the multiplier (above)."""

    @functools.wraps(original)
    def fixed(routing_map, reduce_group, topk=None, with_padding_mask=False):
        global_tokens, local_num, total_num = original(routing_map, reduce_group, topk=topk,
                                                       with_padding_mask=with_padding_mask)
        size = reduce_group.size() if reduce_group is not None else 1
        if with_padding_mask and size > 1:
            local_num = total_num / size
        return global_tokens, local_num, total_num

    return fixed


def install_router_token_count_fix() -> bool:
    """Wrap megatron's ``get_tokens_per_expert_and_token_count`` as the router imported it; idempotent."""
    return install("megatron.core.transformer.moe.router", "get_tokens_per_expert_and_token_count",
                    _router_token_count)
