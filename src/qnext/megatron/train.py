"""Megatron training entry: ``python -m qnext.megatron.train recipe=... key=value ...`` under torchrun.

Built from ``megatron.training``'s pieces, in this order:

1. before any process group (``prepare``): compose and validate the recipe against the world size,
   decide fresh start / resume from the output directory, pick the layer back end (TE when it
   imports), check the converted checkpoint's layout, and resolve the megatron.training argument list
   (``qnext.megatron.args``);
2. megatron's own parse + validation of that list, its global state (microbatch calculator, timers,
   TensorBoard/wandb writers on the last rank) and ``initialize_megatron``'s steps (process groups,
   seeds; ``initialize_megatron_without_dataset_helpers`` says which one is left out and why);
3. our data module (``qnext.data``: chat JSONL -> ids + loss mask, packing) on every rank;
4. ``setup_model_and_optimizer`` with our model provider (``build_model``: Qwen3-Next, TE or TE-free
   spec; then the LoRA hook ``attach_lora`` for ``train.mode=lora``), distributed optimizer (optional
   CPU offload), and the torch_dist load: resume from ``<output_dir>/checkpoints``, else the
   converted checkpoint through ``--pretrained-checkpoint``;
5. the loop: megatron's ``train_step`` with our ``forward_step`` (token-weighted loss on labelled
   positions), held-out loss every ``--eval-interval``, megatron's ``save_checkpoint`` every
   ``--save-interval``; every log step writes the same metrics record as the FSDP backend
   (``metrics.jsonl``; TensorBoard/wandb through megatron's writers) with MFU added.

megatron.training cannot run a step on CPU (gloo), even with ``allow_no_cuda`` (megatron-core 0.19.2):
``initialize_megatron`` asserts CUDA and skips the model-parallel groups without a GPU; the MoE aux-loss
scale, Gated DeltaNet's parameters and RoPE's forward use ``torch.cuda.current_device()``; ``get_model``
calls ``model.cuda(...)`` and makes a ``torch.cuda.Stream()``; the schedule's token counter is allocated
with ``device="cuda"``; ``dist_checkpointing.save`` synchronises CUDA. So without a GPU this entry stops
with a clear error before any process group (CPU training: ``scripts/run-fsdp.sh``); the forward step
and loss are tested on CPU directly.
"""
from __future__ import annotations

import functools
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from .. import rundir
from ..config import to_yaml
from ..config.validate import resolve_path
from ..errors import UserError, cli_main
from .checkpoint import checkpoint_bytes, disk_check, should_save
from .compat.adam_resume import adam_state_report, load_with_adam_state, use_fused_adam
from .compat.initialize import initialize_megatron_without_dataset_helpers
from .data import packed_shape
from .writers import defer_writers, open_writers
from .prepare import Prepared, prepare
from .provider import model_provider

ARGS_FILE = "megatron_args.txt"


class MegatronRun:
    """One training run on megatron.training's pieces (see the module docstring)."""

    def __init__(self, prep: Prepared):
        self.prep, self.cfg = prep, prep.cfg
        self.out = Path(self.cfg.output_dir).expanduser()
        self.t0 = time.time()
        self.metrics = None
        self.planned_peak_gib: Optional[float] = None
        self.run_peak_gib = 0.0  # the max allocated before the current step's window (build, earlier steps)
        self.startup_peak_gib: Optional[float] = None  # the max allocated before the first step

    # -- set-up
    def initialize(self) -> None:
        import torch

        if not torch.cuda.is_available():
            raise UserError(
                "the Megatron backend needs CUDA GPUs (megatron.training asserts CUDA at initialisation, moves the "
                "model to the current CUDA device and allocates its DDP streams and schedule counters there)",
                hint="on CPU use the FSDP backend: bash scripts/run-fsdp.sh recipe=tiny_lora_cpu ...")
        from megatron.training.global_vars import set_global_variables

        from .args import parse_megatron_args

        lg = self.cfg.logging
        if lg.wandb.mode != "auto":
            os.environ["WANDB_MODE"] = lg.wandb.mode
        elif not os.environ.get("WANDB_API_KEY"):
            os.environ.setdefault("WANDB_MODE", "offline")
        rank = int(os.environ.get("RANK", "0"))
        args = parse_megatron_args(self.prep.argv, world_size=self.prep.world_size, rank=rank)
        # no megatron tokenizer: qnext.data tokenizes; the model has exactly the HF vocabulary rows
        args.padded_vocab_size = int(self.prep.hf["vocab_size"])
        self._writer_args = defer_writers(args)  # opened once output_dir is prepared (qnext.megatron.writers)
        set_global_variables(args, build_tokenizer=False)
        initialize_megatron_without_dataset_helpers(args)
        # packed rows of a micro-batch go as one thd row (the micro-batch count was fixed from the recipe above)
        args.seq_length, args.micro_batch_size = packed_shape(args.seq_length, args.micro_batch_size, self.cfg.data.pack)
        self.args = args
        self.rank, self.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        self.is_logger = self.rank == self.world - 1  # last pipeline stage; megatron's writers live there
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.check_memory_plan()

    def check_memory_plan(self) -> None:
        """The planner's peak per GPU against this GPU's memory (qnext.plan.check_fits): a layout that
        cannot fit stops here, with layouts that do, instead of an out-of-memory error at step 1."""
        import torch

        from ..plan import GIB, check_fits, plan

        from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE

        total = torch.cuda.get_device_properties(self.device).total_memory
        try:
            pl = plan(self.cfg, world_size=self.world, fused_adam=HAVE_APEX_OR_TE or self.cfg.train.optimizer_fused)
        except UserError:
            raise
        except Exception as err:  # the plan is advice: a model it cannot count must still train
            self.say(f"warning: no memory plan for this model ({type(err).__name__}: {err})")
            return
        if self.prep.recompute_note != "set by the recipe":
            self.say(self.prep.recompute_note)
        note = check_fits(self.cfg, pl, total, self.world)
        self.planned_peak_gib = round(pl.peak / GIB, 2)
        self.say(f"memory plan: {pl.peak / GIB:.1f} GiB per GPU planned ({pl.layout}); this GPU has {total / GIB:.1f} GiB")
        if note:
            self.say(f"warning: {note}")

    def check_disk(self) -> None:
        """Free space where checkpoints go against one checkpoint's size (``checkpoint_bytes`` of the
        model and optimizer just built), before the first step rather than at the first save."""
        import torch
        from megatron.core import parallel_state as ps

        t = self.cfg.train
        if not t.check_disk or not (t.save_every > 0 or t.save_final or 0 < t.stop_after < t.steps):
            return
        dense = expert = trained = 0.0
        for chunk in self.model:
            for p in chunk.parameters():
                nbytes = p.numel() * p.element_size()
                if getattr(p, "allreduce", True):
                    dense += nbytes
                    trained += p.numel() / ps.get_data_parallel_world_size() if p.requires_grad else 0
                else:
                    expert += nbytes
                    trained += p.numel() / ps.get_expert_data_parallel_world_size() if p.requires_grad else 0
        totals = torch.tensor([dense / ps.get_data_parallel_world_size(),
                               expert / ps.get_expert_data_parallel_world_size(), trained],
                              dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(totals)
        need = checkpoint_bytes(int(totals[0] + totals[1]), int(totals[2]), with_optimizer=not self.args.no_save_optim)
        verdict: list = [None]  # ("warning", text, None) or ("error", message, hint), decided on rank 0
        if self.rank == 0:
            save = Path(self.prep.ckpt.save)
            save.mkdir(parents=True, exist_ok=True)
            try:
                note = disk_check(need, shutil.disk_usage(save).free, t.keep_checkpoints, str(save))
                verdict = [("warning", note, None) if note else None]
            except UserError as err:
                verdict = [("error", err.message, err.hint)]
        torch.distributed.broadcast_object_list(verdict, src=0)  # every rank stops, and the logger says it
        if verdict[0] and verdict[0][0] == "error":
            raise UserError(verdict[0][1], hint=verdict[0][2])
        if verdict[0]:
            self.say(f"warning: {verdict[0][1]}")

    def prepare_output_dir(self) -> None:
        import torch

        if self.rank == 0:
            cleared = rundir.start_run_dir(self.out, self.prep.clear_output, "megatron",
                                           checkpoint=self.prep.ckpt.pretrained, te=self.prep.use_te)
            if cleared:
                self.say(f"output_dir {self.out}: contents replaced ({len(cleared)} entries)")
            (self.out / "config.yaml").write_text(to_yaml(self.cfg))
            (self.out / ARGS_FILE).write_text(" \\\n  ".join(self.prep.argv) + "\n")
            if self.prep.ckpt.pretrained:
                from ..convert.megatron_dir import copy_hf_meta

                Path(self.prep.ckpt.save).mkdir(parents=True, exist_ok=True)
                copy_hf_meta(self.prep.ckpt.pretrained, self.prep.ckpt.save)  # `make export` finds hf/ there
        torch.distributed.barrier()
        open_writers(self.args, self._writer_args)
        self._writer_args = None

    def build_data(self) -> None:
        from megatron.core import parallel_state as ps

        from ..data.dataset import build_datasets
        from ..data.tokenizer import load_tokenizer
        from ..fsdp.sampler import GlobalBatchSampler
        from .data import MicroBatches

        cfg, d, t = self.cfg, self.cfg.data, self.cfg.train
        # model.tokenizer, else the tokenizer the converted checkpoint carries in hf/ (copied into
        # checkpoints/hf when the run started), else the built-in Qwen3-Next tokenizer
        from ..convert.megatron_dir import hf_meta_dir

        roots = (self.prep.ckpt.pretrained, self.prep.ckpt.load)
        tok_dir = rundir.find_tokenizer(cfg, [hf_meta_dir(r) if r else None for r in roots])
        self.tokenizer = load_tokenizer(tok_dir)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.train_set, self.valid_set, self.data_stats = build_datasets(
            resolve_path(d.path), self.tokenizer, d.seq_length, pack=d.pack, valid_fraction=d.valid_fraction,
            seed=d.split_seed, overlong=d.overlong, valid_path=resolve_path(d.valid_path))
        self.say(self.data_stats.summary())
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        accum = t.global_batch_size // (t.micro_batch_size * self.dp_size)
        self.sampler = GlobalBatchSampler(len(self.train_set), t.micro_batch_size, accum, self.dp_size, self.dp_rank, t.seed)
        self.batches = MicroBatches(self.train_set, self.sampler, self.pad_id, d.seq_length, d.pack, self.device)

    def build_model(self) -> None:
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.enums import ModelType
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megatron.core.utils import get_model_config
        from megatron.training.global_vars import get_timers
        from megatron.training.training import setup_model_and_optimizer

        from .checkpoint import checkpoint_tensor_keys
        from .quant_load import fill_quantized_experts
        from .token_scale import FoldedTokenScale, fold_enabled

        ckpt = self.prep.ckpt
        base_keys = None if ckpt.resuming else checkpoint_tensor_keys(ckpt.pretrained)
        provider = model_provider(self.prep, self.args, base_keys)
        import megatron.training.training as mtraining

        load = mtraining.load_checkpoint

        fused = self.cfg.train.optimizer_fused

        load_with_repairs = functools.partial(load_with_adam_state, load, resuming=ckpt.resuming, fused=fused,
                                              load_optim=not self.args.no_load_optim, fp16=bool(self.args.fp16),
                                              say=self.say)

        mtraining.load_checkpoint = load_with_repairs  # for this call only (see resume.load_with_adam_state)
        try:
            self.model, self.optimizer, self.scheduler = setup_model_and_optimizer(
                ModelType.encoder_or_decoder, provider, checkpointing_context={})
        finally:
            mtraining.load_checkpoint = load
        if fused:  # also when no checkpoint was loaded
            n_fused = use_fused_adam(self.optimizer)
            if n_fused:
                self.say(f"optimizer: torch fused AdamW ({n_fused} param groups; train.optimizer_fused=false for foreach)")
        fill_quantized_experts(self.model, self.cfg, ckpt.pretrained, self.say)  # train.lora.base_dtype=fp8 only
        config = get_model_config(self.model[0])
        config.grad_scale_func = self.optimizer.scale_loss
        config.timers = get_timers()
        if config.finalize_model_grads_func is None:
            config.finalize_model_grads_func = finalize_model_grads
        self.token_scale = None
        if config.calculate_per_token_loss and fold_enabled():  # 1/N in the loss, not a pass over the gradients
            self.token_scale = FoldedTokenScale(config, self.optimizer.scale_loss, config.finalize_model_grads_func)
        self.model_config = config
        self.forward_backward = get_forward_backward_func()
        n_total = sum(p.numel() for m in self.model for p in m.parameters())
        n_train = sum(p.numel() for m in self.model for p in m.parameters() if p.requires_grad)
        self.say(f"model: {n_total / 1e6:.1f}M parameters on rank {self.rank}, {n_train / 1e6:.3f}M trained "
                 f"({self.cfg.train.mode}); {'Transformer Engine' if self.prep.use_te else 'TE-free'} layers; "
                 f"start at iteration {self.args.iteration} "
                 f"({'resumed from ' + ckpt.load if ckpt.resuming else 'weights from ' + str(ckpt.pretrained)})")

    # -- helpers
    def say(self, text: str) -> None:
        if self.is_logger:
            if self.metrics is not None:
                self.metrics.print(text)
            else:
                print(text, flush=True)

    def _global_stats(self, step: int) -> tuple[list[int], int, int]:
        """(chat lengths, tokens, labelled tokens) of the whole global batch of 0-based ``step``."""
        from .token_scale import loss_token_count

        lengths, tokens, labelled = [], 0, 0
        for i in self.sampler.global_indices(step):  # the same on every rank
            s = self.train_set[i]
            lengths += list(s.get("seq_lens", [len(s["input_ids"])]))
            tokens += len(s["input_ids"])
            labelled += loss_token_count(s)  # the positions megatron's loss counts
        return lengths, tokens, labelled

    # -- one step
    def train_step(self, step: int) -> dict[str, Any]:
        import torch
        from megatron.core.optimizer_param_scheduler import get_canonical_lr_for_logging
        from megatron.training.training import train_step

        from ..metrics import StepProfile, peak_memory_gib, peak_reserved_gib, reset_step_peak
        from ..syncs import SyncCheck
        from ..throughput import mfu, step_flops
        from .data import forward_step

        batches = self.batches.step(step)
        lengths, tokens, labelled = self._global_stats(step)
        if self.token_scale is not None:
            self.token_scale.set_tokens(labelled)
        torch.cuda.synchronize()
        startup = None
        if self.startup_peak_gib is None:  # the first step of this process: the peak so far is the start-up's
            startup = self.startup_peak_gib = peak_memory_gib(self.device)
        self.run_peak_gib = max(self.run_peak_gib, peak_memory_gib(self.device))
        reset_step_peak(self.device)
        t_start = time.perf_counter()
        with StepProfile(step + 1, self.out, self.rank) as prof:
            with SyncCheck(step + 1, self.out, self.rank) as syncs:  # QNEXT_SYNC_CHECK: where the host waits
                loss_dict, skipped, _, should_exit, _, grad_norm, _, _ = train_step(
                    forward_step, self.batches.iterator(batches), self.model, self.optimizer, self.scheduler,
                    self.model_config, self.forward_backward, iteration=step)
            torch.cuda.synchronize()
        dt = time.perf_counter() - t_start
        self.args.consumed_train_samples += self.cfg.train.global_batch_size
        flops = step_flops(self.prep.hf, lengths, lora=self.cfg.train.mode == "lora")
        tflops = flops / dt / self.world / 1e12
        self.args.num_floating_point_operations_so_far += flops  # saved with each checkpoint
        rec: dict[str, Any] = {
            "loss": float(loss_dict["lm loss"]) if "lm loss" in loss_dict else None,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "lr": get_canonical_lr_for_logging(self.optimizer.param_groups),
            "tokens_per_s": tokens / dt,
            "tflops_per_device": tflops,
            "mfu": mfu(tflops, torch.cuda.get_device_name(self.device)),
            "peak_mem_gib": peak_memory_gib(self.device), "peak_reserved_gib": peak_reserved_gib(self.device),
            "step_time_s": dt,
            "loss_tokens": labelled,
            "epoch": round(self.sampler.epoch_of(step + 1), 3),
        }
        if startup is not None:
            rec["startup_peak_gib"] = startup  # model build + checkpoint load (qnext.plan's start-up term)
        if skipped:
            rec["skipped"] = 1
        if prof.active:
            rec["profiled"] = 1  # slower than the others: benchmarks leave it out
            if prof.path is not None:
                self.say(f"profile of step {step + 1} written to {prof.path}")
        if syncs.active:
            rec["profiled"] = 1  # sync checking slows the step too
            self.say(f"host-device syncs of step {step + 1}: {sum(r['count'] for r in syncs.records)} "
                     f"({sum(r['count'] for r in syncs.unplanned)} unplanned), listed in {syncs.path}")
        if should_exit:
            raise RuntimeError(f"megatron asked to stop at step {step + 1} (rerun state machine)")
        if self.is_logger and rec["loss"] is not None and not math.isfinite(rec["loss"]):
            raise RuntimeError(f"loss is {rec['loss']} at step {step + 1}; lower train.lr or check the data")
        return {k: v for k, v in rec.items() if v is not None}

    # -- held-out loss
    def eval_loss(self) -> dict[str, float]:
        import torch
        from megatron.core import parallel_state as ps

        from .data import eval_batches, eval_micro_batch, forward_step, reduce_report, to_device

        if not self.valid_set:
            return {}
        d, t = self.cfg.data, self.cfg.train
        groups = eval_batches(self.valid_set, t.micro_batch_size, self.dp_size, self.dp_rank, self.args.eval_iters)
        total = torch.zeros(2, device=self.device)
        for m in self.model:
            m.eval()
        with torch.no_grad():
            # one forward-only schedule per round: every pipeline stage runs the same micro-batches
            for ix in groups:
                batch = to_device(eval_micro_batch(self.valid_set, ix, self.pad_id, d.seq_length, d.pack), self.device)
                losses = self.forward_backward(
                    forward_step_func=forward_step, data_iterator=iter([batch]), model=self.model,
                    num_microbatches=1, seq_length=self.args.seq_length,
                    micro_batch_size=self.args.micro_batch_size, forward_only=True)
                rep = reduce_report(losses)
                if rep is not None:
                    total += rep.float()
        for m in self.model:
            m.train()
        torch.distributed.all_reduce(total, group=ps.get_data_parallel_group())
        if not ps.is_pipeline_last_stage(ignore_virtual=True) or total[1] == 0:
            return {}
        loss = float(total[0] / total[1])
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}

    # -- checkpoints
    def save(self, iteration: int) -> None:
        import torch
        from megatron.training.checkpointing import save_checkpoint

        from .checkpoint import prune_checkpoints

        save_checkpoint(iteration, self.model, self.optimizer, self.scheduler,
                        self.args.num_floating_point_operations_so_far, checkpointing_context={})
        torch.distributed.barrier()
        if self.rank == 0:
            removed = prune_checkpoints(self.prep.ckpt.save, self.cfg.train.keep_checkpoints)
            if removed:
                print(f"removed old checkpoint(s): {', '.join(p.name for p in removed)}", flush=True)
        self.say(f"checkpoint: {self.prep.ckpt.save}/iter_{iteration:07d}")

    # -- the loop
    def run(self) -> dict[str, Any]:
        from megatron.training.global_vars import get_tensorboard_writer, get_wandb_writer

        from ..metrics import MetricsLogger, peak_memory_gib

        args, t = self.args, self.cfg.train
        start, total = int(args.iteration), int(args.train_iters)
        stop = min(total, args.exit_interval) if args.exit_interval else total
        self.metrics = MetricsLogger(
            self.out, enabled=self.is_logger, tensorboard=False, wandb="false",
            tensorboard_writer=get_tensorboard_writer(), wandb_run=get_wandb_writer(),
            total_steps=total, progress_bar=self.cfg.logging.progress_bar, start_step=start)
        summary: dict[str, Any] = {"output_dir": str(self.out), "start_step": start, "backend": "megatron"}
        try:
            if start >= total:
                self.say(f"run already complete at step {start} (train.steps={total}); raise train.steps to continue")
                summary["already_complete"] = True
                return summary
            last: dict[str, Any] = {}
            step = start
            if start == 0 and t.eval_every > 0:  # the baseline the later held-out losses compare with
                before = self.eval_loss()
                if before:
                    self.metrics.log(0, before)
                    summary["eval_loss_before"] = before["eval_loss"]
            for step in range(start + 1, stop + 1):
                rec = self.train_step(step - 1)
                if args.eval_interval and step % args.eval_interval == 0 and step != total:
                    rec.update(self.eval_loss())
                if step % max(1, args.log_interval) == 0 or step in (start + 1, total):
                    self.metrics.log(step, rec)
                self.metrics.advance()
                last = rec
                if should_save(step, stop, total, t.save_every, t.save_final):
                    self.save(step)
            summary.update(steps=step, final_loss=last.get("loss"))
            if step < total:
                seen = adam_state_report(self.optimizer)  # what the resumed run's "resume:" line should show
                m = seen["exp_avg_abs_mean"]
                self.say(f"stopped after step {step} of {total} (train.stop_after); resume with resume=auto "
                         f"(Adam state saved: step values {seen['steps']}, mean |exp_avg| "
                         f"{'n/a' if m is None else f'{m:.3e}'})")
                summary["stopped_early"] = True
                return summary
            ev = self.eval_loss()
            if ev:
                self.metrics.log(step, ev)
                summary.update(ev)
            if t.save_final:
                summary["final_checkpoint"] = f"{self.prep.ckpt.save}/iter_{step:07d}"
        finally:
            png = self.metrics.close()
            if png is not None:
                summary["loss_curve"] = str(png)
            summary["wall_s"] = round(time.time() - self.t0, 1)
            summary["planned_peak_gib"] = self.planned_peak_gib
            summary["peak_mem_gib"] = max(self.run_peak_gib, peak_memory_gib(self.device))
            if self.is_logger:
                summary["data"] = self.data_stats.to_dict()
                (self.out / rundir.SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str) + "\n")
        return summary


def train(prep: Prepared) -> dict[str, Any]:
    import torch

    from .compat import install_all

    install_all()  # megatron-core workarounds (qnext.megatron.compat), before any model exists
    run = MegatronRun(prep)
    run.initialize()
    try:
        run.prepare_output_dir()
        run.build_data()
        run.build_model()
        run.check_disk()
        summary = run.run()
        torch.distributed.barrier()  # only on success: a failed rank must exit, not wait for the others
        return summary
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        print("usage: torchrun ... -m qnext.megatron.train [recipe=NAME] [key=value ...]  "
              "(or bash scripts/run-8gpu.sh / scripts/run-multinode.sh)")
        return 0
    prep = prepare(args)
    summary = train(prep)
    if int(os.environ.get("RANK", "0")) == int(os.environ.get("WORLD_SIZE", "1")) - 1:
        from ..metrics import summary_line

        print(summary_line(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
