"""The step's 1/(labelled tokens) folded into the loss, instead of a pass over every gradient.

With ``calculate_per_token_loss`` megatron-core's schedule back-propagates each micro-batch's loss
*sum* and ``finalize_model_grads`` then all-reduces the step's token count and multiplies every
gradient by its inverse (``scale_gradients``): a read and a write of the whole fp32 gradient buffer
per step (34 ms of a 451 ms full-training step of the 4-layer proxy on an H200, FINDINGS.md).

The count is known on the host before the step: the data module builds every micro-batch from the
global batch's samples, the same on every rank (:func:`loss_token_count`). Back-propagation is linear
in its seed, so seeding it with ``1/N`` instead of 1 gives the same gradients as scaling them by
``1/N`` afterwards. :class:`FoldedTokenScale` does that through megatron's own hook,
``config.grad_scale_func``, which seeds the language-model loss and sets the scale of the MoE
auxiliary and MTP losses (``schedules._compute_loss_scale``); and it hands ``finalize_model_grads``
no token count, so the pass is skipped. Data-parallel gradients are summed, not averaged, under
``calculate_per_token_loss`` (megatron's DDP), so ``N`` is the count of the whole global batch.

``QNEXT_FOLD_TOKEN_SCALE=0`` keeps megatron's post-backward scaling (the reference;
``tests/integration/test_megatron_forward_step.py`` compares the two through megatron's schedule).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

from ..data.dataset import IGNORE_INDEX
from .switches import switch_on

ENV = "QNEXT_FOLD_TOKEN_SCALE"


def fold_enabled() -> bool:
    return switch_on(ENV, True)


def loss_token_count(sample: Mapping[str, Any]) -> int:
    """Positions of ``sample`` that carry loss in megatron's convention (``qnext.megatron.data``):
    token t scores ``labels[t+1]``, unless t+1 starts another packed chat."""
    labels = sample["labels"]
    positions = sample.get("position_ids")
    return sum(1 for t in range(1, len(labels))
               if labels[t] != IGNORE_INDEX and (positions is None or positions[t] != 0))


def global_loss_tokens(samples: Iterable[Mapping[str, Any]]) -> int:
    return sum(loss_token_count(s) for s in samples)


class FoldedTokenScale:
    """Installs the folded scale on a megatron ``TransformerConfig``; call :meth:`set_tokens` with the
    global batch's labelled-token count before each training step."""

    def __init__(self, config, scale_loss: Callable, finalize: Callable):
        self._scale_loss = scale_loss
        self._finalize = finalize
        self.inverse = 1.0
        config.grad_scale_func = self.scale
        config.finalize_model_grads_func = self.finalize

    def set_tokens(self, n: int) -> None:
        self.inverse = 1.0 / max(int(n), 1)  # megatron clamps the count to 1 too

    def scale(self, loss):
        return self._scale_loss(loss) * self.inverse

    def finalize(self, model, num_tokens=None, *args, **kwargs):
        # the gradients already carry 1/N: no count, so no scaling pass (the all-reduces still run)
        return self._finalize(model, None, *args, **kwargs)
