"""FSDP training entry: ``python -m qnext.fsdp.train recipe=... train.steps=...`` (or torchrun).

One step = ``accum`` micro-batches per rank, ``global_batch = micro * accum * world``. The loss is the
mean cross-entropy over every labelled token of the global batch (token-weighted, so 1 rank with
accumulation and N ranks without it compute the same number), plus the router auxiliary loss
when enabled. Order of work, all before the first step: validate the config and the output
directory (no process group yet), join the process group, read the data, load the HF model, apply
LoRA / activation checkpointing / FSDP, restore a checkpoint, generate on the eval prompts.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..config import RecipeConfig, to_yaml
from ..config.validate import resolve_path
from ..errors import UserError, cli_main
from ..fsutil import atomic_write_json, atomic_write_text
from .. import rundir
from ..rundir import SUMMARY_FILE
from . import checkpoint as ckpt
from .prepare import RunPlan, checkpoint_dir, prepare, tokenizer_dir
from .dist import DistEnv, all_reduce_sum, barrier, init_distributed, shutdown

def compute_dtype(cfg: RecipeConfig, device: torch.device) -> str:
    """bf16 on GPUs when asked; float32 on CPU always (bf16 matmuls on CPU are slow and the tests
    compare float32 numbers)."""
    if device.type == "cpu":
        return "fp32"
    return cfg.parallel.dtype


def active_params_per_token(hf_config: Any, model: torch.nn.Module) -> float:
    """Non-embedding parameters one token passes through (routed experts counted top_k of E)."""
    total = routed = 0
    for name, p in model.named_parameters():
        if "embed_tokens" in name or "lm_head" in name:
            continue
        total += p.numel()
        if ".mlp.experts." in name and "shared" not in name:
            routed += p.numel()
    e = getattr(hf_config, "num_experts", 0) or 0
    k = getattr(hf_config, "num_experts_per_tok", 0) or 0
    return float(total - routed + (routed * k / e if e else routed))


# --------------------------------------------------------------------------- the trainer


class Trainer:
    """Holds the pieces of one run; ``run()`` trains, evaluates and writes the final artefacts."""

    def __init__(self, cfg: RecipeConfig, plan: RunPlan, env: DistEnv, hf_dict: dict[str, Any]):
        self.cfg, self.plan, self.env = cfg, plan, env
        self.out = plan.output_dir
        self.lora = cfg.train.mode == "lora"
        self.dtype = compute_dtype(cfg, env.device)
        t = cfg.train
        self.accum = t.global_batch_size // (t.micro_batch_size * env.world_size)
        self.ckpt_dir = checkpoint_dir(cfg)
        self.t0 = time.time()

    # -- logging helpers
    def say(self, text: str) -> None:
        if self.env.is_main:
            if getattr(self, "metrics", None) is not None:
                self.metrics.print(text)
            else:
                print(text, flush=True)

    # -- building
    def setup(self) -> None:
        from ..data.collate import collate  # noqa: F401  (fail early if the data package is broken)
        from ..data.dataset import build_datasets
        from ..data.tokenizer import load_tokenizer

        cfg, env = self.cfg, self.env
        self.tokenizer = load_tokenizer(tokenizer_dir(cfg, self.ckpt_dir))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        d = cfg.data
        self.train_set, self.valid_set, stats = build_datasets(
            resolve_path(d.path), self.tokenizer, d.seq_length, pack=d.pack, valid_fraction=d.valid_fraction,
            seed=d.split_seed, overlong=d.overlong, valid_path=resolve_path(d.valid_path),
        )
        self.data_stats = stats
        self.say(stats.summary())

        # the output directory is touched only now that the inputs have been read without error
        if env.is_main:
            cleared = rundir.start_run_dir(self.out, self.plan.clear, "fsdp", checkpoint=str(self.ckpt_dir))
            if cleared:
                self.say(f"output_dir {self.out}: cleared {len(cleared)} entries of an earlier attempt without a checkpoint"
                         if not cfg.overwrite else f"output_dir {self.out}: contents replaced (overwrite=true)")
            atomic_write_text(self.out / "config.yaml", to_yaml(cfg))
        barrier()

        from .model import CausalLMLoss, router_aux_coef
        from .parallelize import (apply_ac, apply_fsdp, apply_lora, count_parameters, decoder_layers, needs_fsdp,
                                  set_full_training)
        from .sampler import GlobalBatchSampler
        from ..models.hf import force_torch_gdn_path, load_hf_model

        if env.device.type == "cpu":
            force_torch_gdn_path()
        # frozen base weights in the compute dtype; trained weights in float32 (master copy)
        load_dtype = torch.bfloat16 if (self.dtype == "bf16" and self.lora) else torch.float32
        model = load_hf_model(self.ckpt_dir, load_dtype, "cpu")
        model.config.use_cache = False
        self.hf_config = model.config
        self.flops_per_token = 6.0 * active_params_per_token(model.config, model)
        if self.lora:
            for p in model.parameters():
                p.requires_grad_(False)
            if cfg.train.lora.experts or cfg.train.lora.shared_expert:
                # PEFT 0.21 saves (shared-)expert adapters of transformers 5's fused MoE as
                # target_parameters with a rank_pattern, which export's streaming merge cannot apply
                key = "experts" if cfg.train.lora.experts else "shared_expert"
                raise UserError(f"train.lora.{key}=true is not supported by the FSDP backend yet",
                                hint=f"leave train.lora.{key}=false (or use the Megatron backend)")
            model = apply_lora(model, cfg.train.lora, seed=cfg.train.seed)
        else:
            model = set_full_training(model)
        if cfg.parallel.recompute not in ("none", "auto"):  # auto: the Megatron planner's choice; here none
            apply_ac(model)
        self.peft_model = model if self.lora else None
        self.root = CausalLMLoss(model, router_aux_coef(self.hf_config, cfg.train.router_aux_loss_coef))
        self.n_trainable, self.n_total = count_parameters(self.root)

        from torch.distributed.device_mesh import init_device_mesh

        self.sharded = needs_fsdp(env.world_size, env.device.type, load_dtype, self.dtype)
        if self.sharded:
            mesh = init_device_mesh(env.device.type, (env.world_size,))
            apply_fsdp(self.root, decoder_layers(self.root), mesh, self.dtype)
        else:  # one process, weights already in the compute dtype: nothing to shard or cast
            self.root.to(env.device)

        from .optim import build_optimizer

        self.optimizer = build_optimizer(self.root.parameters(), cfg.train)
        self.sampler = GlobalBatchSampler(len(self.train_set), cfg.train.micro_batch_size, self.accum,
                                          env.world_size, env.rank, cfg.train.seed)
        self.say(
            f"model: {self.n_total / 1e6:.1f}M parameters, {self.n_trainable / 1e6:.3f}M trained ({cfg.train.mode}); "
            f"{env.world_size} rank(s) on {env.device.type} ({env.backend}), {self.dtype}, "
            f"{'FSDP2' if self.sharded else 'not FSDP-wrapped (nothing to shard or cast)'}; global batch "
            f"{cfg.train.global_batch_size} = micro {cfg.train.micro_batch_size} x accum {self.accum} x {env.world_size}"
        )

    # -- batches
    def _batch(self, indices: Sequence[int], samples: Sequence[dict]) -> dict[str, Any]:
        from ..data.collate import collate
        from .model import batch_to_device

        b = collate([samples[i] for i in indices], self.pad_id)
        if not self.cfg.data.pack:
            b.pop("cu_seqlens", None)
        else:  # packed: chats kept apart by position_ids / cu_seqlens, not by a mask
            b.pop("attention_mask", None)
        b.pop("max_seqlen", None)
        return batch_to_device(b, self.env.device)

    # -- one optimizer step
    def train_step(self, step: int) -> dict[str, float]:
        from ..metrics import StepProfile

        with StepProfile(step + 1, Path(self.cfg.output_dir).expanduser(), self.env.rank) as prof:
            rec = self._train_step(step)
        if prof.active:
            rec["profiled"] = 1  # slower than the others: benchmarks leave it out
            if prof.path is not None:
                self.say(f"profile of step {step + 1} written to {prof.path}")
        return rec

    def _train_step(self, step: int) -> dict[str, float]:
        from .optim import lr_at

        from ..metrics import reset_step_peak

        env, t = self.env, self.cfg.train
        reset_step_peak(env.device)
        t_start = time.perf_counter()
        micro = [self._batch(ix, self.train_set) for ix in self.sampler.micro_batches(step)]
        local_tokens = sum(float((b["labels"][:, 1:] != -100).sum()) for b in micro)
        local_inputs = sum(float(b["attention_mask"].sum()) if "attention_mask" in b else float(b["input_ids"].numel())
                           for b in micro)
        global_tokens, global_inputs = all_reduce_sum([local_tokens, local_inputs], env.device)
        denom = max(global_tokens, 1.0)
        aux_weight = self.root.aux_loss_coef / (self.accum * env.world_size)
        ce_total, aux_total = 0.0, 0.0
        self.root.train()
        for i, batch in enumerate(micro):
            if self.sharded:
                self.root.set_requires_gradient_sync(i == len(micro) - 1)
            ce_sum, _n, aux = self.root(**batch)
            # FSDP averages gradients over ranks; scale by the world size so the result is the global token mean
            loss = (ce_sum / denom + aux_weight * aux) * env.world_size
            loss.backward()
            ce_total += float(ce_sum.detach())
            aux_total += float(aux.detach())
        params = [p for p in self.root.parameters() if p.requires_grad]
        max_norm = t.grad_clip if t.grad_clip > 0 else float("inf")
        gnorm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(gnorm, "full_tensor"):
            gnorm = gnorm.full_tensor()
        lr = lr_at(step, t)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        ce_global, aux_global = all_reduce_sum([ce_total, aux_total], env.device)
        if env.device.type == "cuda":
            torch.cuda.synchronize(env.device)
        dt = time.perf_counter() - t_start
        from ..metrics import peak_memory_gib, peak_reserved_gib

        rec = {
            "loss": ce_global / denom,
            "grad_norm": float(gnorm),
            "lr": lr,
            "tokens_per_s": global_inputs / dt,
            "tflops_per_device": self.flops_per_token * global_inputs / dt / env.world_size / 1e12,
            "peak_mem_gib": peak_memory_gib(env.device), "peak_reserved_gib": peak_reserved_gib(env.device),
            "step_time_s": dt,
            "loss_tokens": int(global_tokens),
            "epoch": round(self.sampler.epoch_of(step + 1), 3),
        }
        if self.root.aux_loss_coef > 0:
            rec["aux_loss"] = aux_global / (self.accum * env.world_size)
        if not math.isfinite(rec["loss"]):
            raise RuntimeError(f"loss is {rec['loss']} at step {step + 1}; lower train.lr or check the data")
        return rec

    # -- evaluation
    def eval_loss(self) -> dict[str, float]:
        if not self.valid_set:
            return {}
        from ..eval import heldout_loss

        env, t = self.env, self.cfg.train
        mb = t.micro_batch_size
        batches = [list(range(i, min(i + mb, len(self.valid_set)))) for i in range(0, len(self.valid_set), mb)]
        if t.eval_batches > 0:
            batches = batches[: t.eval_batches * env.world_size]
        per_rank = math.ceil(len(batches) / env.world_size)
        mine = batches[env.rank * per_rank:(env.rank + 1) * per_rank]
        # every rank runs the same number of forwards (FSDP all-gathers are collective)
        dummy = per_rank - len(mine)

        def loss_fn(ix):
            ce, n, _ = self.root(**self._batch(ix, self.valid_set))
            return ce, n

        self.root.eval()
        with torch.no_grad():
            for _ in range(dummy):
                loss_fn(batches[0])
            res = heldout_loss(loss_fn, mine, all_reduce=lambda v: all_reduce_sum(v, env.device))
        self.root.train()
        return res

    def generations(self, tag: str) -> dict[str, Any] | None:
        """Greedy replies to the eval prompts, on every rank in lockstep; rank 0 writes them."""
        if not self.cfg.data.eval_prompts:
            return None
        from ..eval import generate_replies, load_eval_prompts, score, write_generations

        prompts = load_eval_prompts(resolve_path(self.cfg.data.eval_prompts))

        def gen(ids, mask, gen_cfg):
            return self.root(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)

        self.root.eval()
        t0 = time.perf_counter()
        with torch.no_grad():
            replies = generate_replies(gen, self.tokenizer, prompts, max_new_tokens=self._max_new_tokens(prompts),
                                       device=self.env.device)
        self.root.train()
        result = score(prompts, replies)
        result["seconds"] = round(time.perf_counter() - t0, 2)
        if self.env.is_main:
            write_generations(self.out / f"generations_{tag}.jsonl", result)
            kinds = "".join(f", {k} {v['correct']}/{v['total']}" for k, v in result["by_kind"].items())
            self.say(f"generations {tag} training: {result['correct']}/{result['total']} answers contained "
                     f"({result['accuracy']:.0%}{kinds}), {result['seconds']:.1f}s")
            for it in result["items"][:3]:
                self.say(f"  Q: {it['prompt']!r} -> {it['reply'][:80]!r} (expected {it['answer']!r})")
        return result

    def _max_new_tokens(self, prompts) -> int:
        longest = max(len(self.tokenizer(p.answer, add_special_tokens=False)["input_ids"]) for p in prompts)
        return int(min(256, longest + 16))

    # -- checkpoints and final artefacts
    def _trainer_state(self, step: int) -> dict[str, Any]:
        from .optim import lr_at

        c = self.cfg
        return {
            "step": step,
            "lr": lr_at(max(step - 1, 0), c.train),
            "data_position": step * c.train.global_batch_size,
            "world_size": self.env.world_size,
            "global_batch_size": c.train.global_batch_size,
            "seed": c.train.seed,
            "mode": c.train.mode,
            "checkpoint": str(self.ckpt_dir),
        }

    def gather_trainable(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) trained tensors on rank 0, keyed by PEFT / HF names (collective)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.root, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=self.lora))
        return {k.removeprefix("model."): v for k, v in sd.items()}

    def write_adapter(self, directory: Path, overwrite: bool = False) -> None:
        """Collective gather; rank 0 writes a PEFT adapter directory."""
        sd = self.gather_trainable()
        if self.env.is_main:
            from ..export import save_peft_adapter

            save_peft_adapter(self.peft_model, sd, directory, base_checkpoint=self.ckpt_dir, overwrite=overwrite)

    def save(self, step: int) -> Path:
        extra = (lambda tmp: self.write_adapter(tmp / "adapter")) if self.lora else None
        path = ckpt.save_checkpoint(self.out, step, self.root, self.optimizer, self._trainer_state(step),
                                    rank=self.env.rank, trainable_only=self.lora, keep=self.cfg.train.keep_checkpoints,
                                    write_extra=extra)
        self.say(f"checkpoint: {path}")
        return path

    def write_final(self) -> Path:
        if self.lora:
            final = self.out / "adapter"
            self.write_adapter(final, overwrite=True)
        else:
            final = self.out / "model"
            sd = self.gather_trainable()
            if self.env.is_main:
                from ..export import write_checkpoint_like

                write_checkpoint_like(self.ckpt_dir, sd, final, overwrite=True)
        barrier()
        return final

    # -- the run
    def run(self) -> dict[str, Any]:
        cfg, env, t = self.cfg, self.env, self.cfg.train
        start = 0
        if self.plan.resume_from is not None:
            state = ckpt.load_checkpoint(self.plan.resume_from, self.root, self.optimizer, rank=env.rank,
                                         world_size=env.world_size, trainable_only=self.lora)
            start = int(state["step"])
            if state.get("global_batch_size") != t.global_batch_size or state.get("seed") != t.seed:
                self.say("warning: train.global_batch_size or train.seed differ from the checkpoint's; "
                         "the data order after resuming differs from an uninterrupted run")
            self.say(f"resumed from {self.plan.resume_from} at step {start}")
        from ..metrics import MetricsLogger

        lg = cfg.logging
        self.metrics = MetricsLogger(
            self.out, enabled=env.is_main, tensorboard=lg.tensorboard, wandb=lg.wandb.enabled,
            wandb_project=lg.wandb.project, wandb_mode=lg.wandb.mode, run_name=self.out.name,
            config=json.loads(json.dumps(_as_dict(cfg), default=str)), total_steps=t.steps,
            progress_bar=lg.progress_bar, start_step=start,
        )
        summary: dict[str, Any] = {"output_dir": str(self.out), "start_step": start}
        try:
            if start >= t.steps:
                self.say(f"run already complete at step {start} (train.steps={t.steps}); "
                         "raise train.steps to continue or pass overwrite=true to start over")
                summary["already_complete"] = True
                return summary
            if start == 0:
                before = self.generations("before")
                if before is not None:
                    summary["before"] = {k: before[k] for k in ("correct", "total", "accuracy", "by_kind")}
                if t.eval_every > 0:  # the baseline the later held-out losses compare with
                    ev0 = self.eval_loss()
                    if ev0:
                        self.metrics.log(0, ev0)
                        summary["eval_loss_before"] = ev0["eval_loss"]
            stop = t.steps if t.stop_after <= 0 else min(t.steps, t.stop_after)
            last_rec: dict[str, Any] = {}
            step = start
            for step in range(start + 1, stop + 1):
                rec = self.train_step(step - 1)
                if t.eval_every > 0 and step % t.eval_every == 0 and step != t.steps:
                    rec.update(self.eval_loss())
                if step % max(1, t.log_every) == 0 or step in (start + 1, t.steps):
                    self.metrics.log(step, rec)
                self.metrics.advance()
                last_rec = rec
                if t.save_every > 0 and step % t.save_every == 0 and step != stop:
                    self.save(step)
            summary.update(steps=step, final_loss=last_rec.get("loss"))
            if step > start and (t.save_final or step < t.steps):
                self.save(step)
            if step < t.steps:  # stop_after: a checkpoint to resume from, no final evaluation
                self.say(f"stopped after step {step} of {t.steps} (train.stop_after); resume with resume=auto")
                summary["stopped_early"] = True
                return summary
            ev = self.eval_loss()
            if ev:
                self.metrics.log(step, ev)
                summary.update(ev)
            after = self.generations("after")
            if after is not None:
                summary["after"] = {k: after[k] for k in ("correct", "total", "accuracy", "by_kind")}
            if t.save_final:
                final = self.write_final()
                summary["final"] = str(final)
                self.say(f"final {'adapter' if self.lora else 'model'}: {final}")
        finally:
            png = self.metrics.close()
            if png is not None:
                summary["loss_curve"] = str(png)
            summary["wall_s"] = round(time.time() - self.t0, 1)
            if env.is_main:
                summary["data"] = self.data_stats.to_dict()
                atomic_write_json(self.out / SUMMARY_FILE, summary)
        return summary


def _as_dict(cfg: RecipeConfig) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg))  # type: ignore[return-value]


# --------------------------------------------------------------------------- entry points


def train(cfg: RecipeConfig, hf: dict[str, Any], plan: RunPlan) -> dict[str, Any]:
    env = init_distributed(cfg.parallel.device)
    try:
        if env.device.type == "cpu" and cfg.parallel.dtype == "bf16" and env.is_main:
            print("note: training in float32 on CPU (parallel.dtype=bf16 applies to GPUs)", flush=True)
        torch.manual_seed(cfg.train.seed)
        trainer = Trainer(cfg, plan, env, hf)
        trainer.setup()
        return trainer.run()
    finally:
        shutdown()


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        print("usage: python -m qnext.fsdp.train [recipe=NAME] [key=value ...]   (torchrun for several processes)")
        return 0
    cfg, hf, plan = prepare(args)
    summary = train(cfg, hf, plan)
    if int(os.environ.get("RANK", "0")) == 0:
        from ..metrics import summary_line

        print(summary_line(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
