"""Worker for test_megatron_optimizer_resume_cpu.py: megatron-core's DistributedOptimizer (torch Adam,
no Apex/TE) trained, saved, rebuilt, loaded and trained on, on the CPU, the way qnext's Megatron entry
resumes a run. Prints one JSON line.

megatron-core assumes CUDA in a few allocations and type checks; this process redirects those to the
CPU (``_cpu_only``). Megatron's optimizer code, its sharded state dicts and its load path run
unchanged. Only the file round trip is replaced by an in-memory one: the sharded state dict's tensors
and objects are copied, as ``dist_checkpointing.load`` would return them. Its async writer needs
multiprocessing, which this kind of machine may not offer.

usage: python megatron_resume_worker.py {fixed,no-prime,no-unshare,step-zero,fused,fused-vs-foreach}
(``fused``: both runs on torch's fused AdamW as the Megatron entry sets it up, ``use_fused_adam`` before
and after the load; ``fused-vs-foreach``: the uninterrupted run on foreach Adam, the resumed one fused.)
"""
from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))


def _cpu_only() -> None:
    def to_cpu(fn):
        def wrapped(*a, **k):
            if str(k.get("device", "")).startswith("cuda"):
                k["device"] = "cpu"
            return fn(*a, **k)
        return wrapped

    torch.tensor, torch.empty, torch.zeros = to_cpu(torch.tensor), to_cpu(torch.empty), to_cpu(torch.zeros)
    torch.cuda.synchronize = lambda *a, **k: None
    plain_type = torch.Tensor.type

    def cuda_type(self, *a, **k):  # DistributedOptimizer accepts only torch.cuda.*Tensor parameters
        t = plain_type(self, *a, **k)
        return t.replace("torch.", "torch.cuda.", 1) if not (a or k) and not t.startswith("torch.cuda.") else t

    torch.Tensor.type = cuda_type


def _torch_opts(opt):
    return [opt.optimizer] if hasattr(opt, "optimizer") else [c.optimizer for c in opt.chained_optimizers]


def main(mode: str) -> dict:
    _cpu_only()
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedBase, apply_factories
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

    from qnext.megatron.parallel import construction_device, initialize_parallel
    from qnext.megatron.compat.adam_resume import (adam_state_report, load_with_adam_state, prime_adam_states, unshare_adam_steps,
                                      use_fused_adam)

    initialize_parallel()
    cfg = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1, use_cpu_initialization=True,
                            params_dtype=torch.float32)
    meta = {"distrib_optim_sharding_type": "dp_reshardable"}  # megatron.training's default

    class Two(MegatronModule):
        def __init__(self):
            super().__init__(cfg)
            self.a = ColumnParallelLinear(8, 16, config=cfg, init_method=torch.nn.init.normal_, bias=False)
            self.b = ColumnParallelLinear(16, 4, config=cfg, init_method=torch.nn.init.normal_, bias=False)

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            metadata = ensure_metadata_has_dp_cp_group(metadata)
            return {**self.a.sharded_state_dict(prefix + "a.", sharded_offsets, metadata),
                    **self.b.sharded_state_dict(prefix + "b.", sharded_offsets, metadata)}

    def build(seed: int, fused: bool = False):
        torch.manual_seed(seed)
        with construction_device("cpu"):
            model = Two()
            ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(use_distributed_optimizer=True,
                                                                             grad_reduce_in_fp32=True), model)
        opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, adam_beta1=0.9, adam_beta2=0.95,
                                                     use_distributed_optimizer=True), [ddp])
        if fused:
            assert use_fused_adam(opt) == len(opt.param_groups) > 0
        return model, ddp, opt

    gen = torch.Generator().manual_seed(5)
    grads = [[torch.randn(16, 8, generator=gen), torch.randn(4, 16, generator=gen)] for _ in range(6)]

    def train(model, ddp, opt, steps):
        for i in steps:
            ddp.zero_grad_buffer()
            opt.zero_grad()
            for p, g in zip((model.a.weight, model.b.weight), grads[i]):
                p.main_grad.copy_(g)
            with construction_device("cpu"):
                opt.step()

    fused = mode in ("fused", "fused-vs-foreach")
    model, ddp, opt = build(0, fused=mode == "fused")
    train(model, ddp, opt, range(6))
    reference = [model.a.weight.detach().clone(), model.b.weight.detach().clone()]

    model, ddp, opt = build(0, fused=fused)
    train(model, ddp, opt, range(3))
    saved = {"model": model.sharded_state_dict(), "optimizer": None}
    saved["optimizer"] = opt.sharded_state_dict(saved["model"], metadata=meta)
    apply_factories(saved)

    def copied(x):
        if isinstance(x, ShardedBase):
            return x.data.detach().clone() if torch.is_tensor(x.data) else copy.deepcopy(x.data)
        if isinstance(x, LocalNonpersistentObject):
            return x.unwrap()
        return x.detach().clone() if torch.is_tensor(x) else copy.deepcopy(x)

    loaded = dict_list_map_inplace(copied, saved)

    model2, ddp2, opt2 = build(1, fused=fused)  # other initial weights: everything must come from the "checkpoint"
    out: dict = {"mode": mode}

    def load(model, optimizer):
        """What megatron's load_checkpoint does to the optimizer and weights, from memory; (iteration, flops)."""
        with construction_device("cpu"), torch.no_grad():
            optimizer.sharded_state_dict(model.sharded_state_dict(), is_loading=True, metadata=meta)
            optimizer.load_state_dict(loaded["optimizer"])
            model.a.weight.copy_(loaded["model"]["a.weight"])
            model.b.weight.copy_(loaded["model"]["b.weight"])
        if mode == "step-zero":  # a load that restored the wrong step count
            for o in _torch_opts(optimizer):
                for s in o.state.values():
                    s["step"] = torch.tensor(0.0)
        out["after_load"] = adam_state_report(optimizer)
        return 3, 0

    try:
        if mode in ("no-prime", "no-unshare"):  # the repairs one by one, each left out once
            if mode != "no-prime":
                prime_adam_states(opt2)
            load(model2, opt2)
            if mode != "no-unshare":
                unshare_adam_steps(opt2)
        else:  # exactly what the training entry runs around megatron's load_checkpoint
            said: list[str] = []
            load_with_adam_state(load, model2, opt2, resuming=True, fused=fused, say=said.append)
            out["said"] = said
            out["restored"] = int(said[0].split(" in ")[-1].split()[0]) if "step set to" in said[0] else 0
    except AssertionError as err:
        out["load_error"] = f"AssertionError {err}"
        return out
    if fused:
        out["fused_flag_from_load"] = [g.get("fused") for o in _torch_opts(opt2) for g in o.param_groups]
        out["fused_groups"] = use_fused_adam(opt2)
        out["fused_after_load"] = [bool(g.get("fused")) for o in _torch_opts(opt2) for g in o.param_groups]
    train(model2, ddp2, opt2, range(3, 6))
    out["max_abs_diff"] = max(float((a - b.detach()).abs().max()) for a, b in zip(reference, (model2.a.weight, model2.b.weight)))
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])), flush=True)
    # the result is out: leave without the interpreter's teardown, in which gloo's threads can abort the
    # process ("terminate called without an active exception", seen once in CI after a load_error run)
    sys.stderr.flush()
    os._exit(0)
