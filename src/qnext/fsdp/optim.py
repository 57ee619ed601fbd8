"""AdamW and the learning-rate schedule: linear warmup, then cosine decay to ``min_lr``."""
from __future__ import annotations

import math
from typing import Iterable

import torch

from ..config.schema import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): warmup over ``warmup_steps`` steps
    (reaching ``lr`` at the last warmup step), then cosine from ``lr`` to ``min_lr`` at the final step."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(1, cfg.steps - cfg.warmup_steps - 1)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps) if cfg.steps - cfg.warmup_steps > 1 else 1.0
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    # lr is the peak; the scheduler scales it per step. fused: one kernel per step and no temporaries,
    # where foreach allocates the square root of every second moment at once (4 B per trained weight)
    fused = bool(getattr(cfg, "optimizer_fused", False)) and all(p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                             **({"fused": True} if fused else {}))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    base = cfg.lr
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, cfg) / base)
