"""Recipe -> megatron.training arguments: the list parses with megatron's own parser (and passes its
validation where that runs without a GPU), the values land where megatron reads them, and the
problems we check first name the recipe key."""
from __future__ import annotations

from pathlib import Path

import pytest

from qnext.config import load_config, validate_config
from qnext.errors import UserError
from qnext.megatron.args import check_megatron_recipe, megatron_argv, parse_megatron_args
from qnext.megatron.checkpoint import CheckpointPlan, checkpoint_plan

pytest.importorskip("megatron.training")

CONVERTED = "/data/qwen3-next-80b-torch_dist"


def resolve(overrides, world, *, use_te=False, wandb=False, ckpt=None):
    cfg = load_config(list(overrides))
    hf = validate_config(cfg, world_size=world)
    plan = ckpt or CheckpointPlan(save=f"{cfg.output_dir}/checkpoints", load=f"{cfg.output_dir}/checkpoints",
                                  pretrained=CONVERTED, resuming=False)
    return cfg, megatron_argv(cfg, hf, use_te=use_te, ckpt=plan, wandb_installed=wandb)


def test_80b_lora_recipe_parses_validates_and_lands(tmp_path):
    cfg, argv = resolve(["recipe=qwen3_next_80b_lora", f"output_dir={tmp_path}/run"], 8)
    a = parse_megatron_args(argv, world_size=8)  # megatron's parser and validate_args
    # model (models/qwen3_next_80b_a3b.sh's flags)
    assert (a.num_layers, a.hidden_size, a.num_attention_heads, a.num_query_groups, a.kv_channels) == (48, 2048, 16, 2, 256)
    assert (a.num_experts, a.moe_router_topk, a.moe_ffn_hidden_size, a.moe_shared_expert_intermediate_size) == (512, 10, 512, 512)
    assert a.experimental_attention_variant == "gated_delta_net" and a.linear_attention_freq == 4
    assert a.moe_grouped_gemm is False and a.transformer_impl == "local"  # TE-free experts
    assert a.gradient_accumulation_fusion is False
    # layout (parallel/8xh100.yaml) and what megatron derives from it
    assert (a.tensor_model_parallel_size, a.pipeline_model_parallel_size, a.expert_model_parallel_size,
            a.expert_tensor_parallel_size, a.context_parallel_size) == (1, 1, 8, 1, 1)
    assert a.data_parallel_size == 8 and a.sequence_parallel is False
    assert a.recompute_granularity == "selective" and a.recompute_modules == ["core_attn", "moe"]
    # batch, schedule, optimizer
    assert (a.micro_batch_size, a.global_batch_size, a.seq_length) == (1, 32, 4096)
    assert a.global_batch_size // (a.micro_batch_size * a.data_parallel_size) == 4  # micro-batches per step
    assert (a.train_iters, a.lr_warmup_iters, a.lr_decay_iters, a.lr_decay_style) == (500, 20, 500, "cosine")
    assert (a.lr, a.min_lr, a.weight_decay, a.clip_grad) == (cfg.train.lr, cfg.train.min_lr, 0.0, 1.0)
    assert (a.adam_beta1, a.adam_beta2, a.adam_eps, a.seed) == (0.9, 0.95, 1e-8, 1234)
    assert a.optimizer == "adam" and a.use_distributed_optimizer and not a.optimizer_cpu_offload
    assert a.bf16 and a.calculate_per_token_loss
    # checkpoints and logging
    assert a.ckpt_format == "torch_dist" and a.pretrained_checkpoint == CONVERTED
    assert a.save == a.load == f"{tmp_path}/run/checkpoints" and a.dist_ckpt_strictness == "log_unexpected"
    assert (a.save_interval, a.log_interval, a.eval_interval, a.eval_iters) == (100, 1, 100, 8)
    assert a.tensorboard_dir == f"{tmp_path}/run/tensorboard" and a.wandb_project is None
    assert a.distributed_backend == "nccl" and a.exit_interval is None


def test_80b_full_recipe_with_te_and_optimizer_offload(tmp_path):
    over = ["recipe=qwen3_next_80b_full", f"output_dir={tmp_path}/run", "train.optimizer_cpu_offload=true"]
    _, argv = resolve(over, 32, use_te=True)
    # validate_args asks the GPU's compute capability for --moe-grouped-gemm (TE path): parse only
    a = parse_megatron_args(argv, world_size=32, validate=False)
    assert (a.pipeline_model_parallel_size, a.expert_model_parallel_size, a.tensor_model_parallel_size) == (4, 8, 1)
    assert a.transformer_impl == "transformer_engine" and a.moe_grouped_gemm
    assert a.recompute_granularity == "full" and a.recompute_method == "uniform" and a.recompute_num_layers == 1
    assert a.optimizer_cpu_offload and a.use_precision_aware_optimizer and a.overlap_cpu_optimizer_d2h_h2d
    assert (a.global_batch_size, a.lr, a.weight_decay) == (128, 1e-5, 0.01)
    # the same layout through megatron's validation (TE-free flags, no GPU query)
    _, argv = resolve(over, 32)
    a = parse_megatron_args(argv, world_size=32)
    assert a.data_parallel_size == 8 and a.transformer_pipeline_model_parallel_size == 4


def test_overrides_land(tmp_path):
    _, argv = resolve(["recipe=qwen3_next_80b_lora", f"output_dir={tmp_path}/r", "train.router_aux_loss_coef=0.01",
                       "logging.tensorboard=false", "train.stop_after=30", "train.save_every=0", "train.eval_every=0",
                       "train.steps=50", "train.warmup_steps=5", "parallel.recompute=none", "train.lr=1e-4"], 8, wandb=True)
    a = parse_megatron_args(argv, world_size=8)
    assert a.moe_aux_loss_coeff == 0.01  # validate_args unwraps a one-element list
    assert a.tensorboard_dir is None
    assert a.exit_interval == 30 and a.save_interval == 30 and a.eval_interval == 50
    assert a.recompute_granularity is None and a.lr == 1e-4 and a.lr_warmup_iters == 5
    assert (a.wandb_project, a.wandb_exp_name, a.wandb_save_dir) == ("qnext", "r", f"{tmp_path}/r/wandb")


def test_resume_plan_reads_the_output_dir(tmp_path):
    over = ["recipe=qwen3_next_80b_lora", f"output_dir={tmp_path}/run", f"model.megatron_checkpoint={tmp_path}/conv"]
    cfg = load_config(over)
    fresh = checkpoint_plan(cfg)
    assert not fresh.resuming and fresh.pretrained == f"{tmp_path}/conv"
    (tmp_path / "run/checkpoints").mkdir(parents=True)
    (tmp_path / "run/checkpoints/latest_checkpointed_iteration.txt").write_text("200")
    plan = checkpoint_plan(cfg)
    assert plan.resuming
    _, argv = resolve(over[:2], 8, ckpt=plan)
    a = parse_megatron_args(argv, world_size=8)
    assert a.load == f"{tmp_path}/run/checkpoints" and a.pretrained_checkpoint is None
    assert a.dist_ckpt_strictness == "raise_unexpected"
    assert not checkpoint_plan(load_config(over + ["overwrite=true"])).resuming
    with pytest.raises(UserError, match="resume="):
        checkpoint_plan(load_config(over + [f"resume={tmp_path}/elsewhere"]))


@pytest.mark.parametrize("overrides, key", [
    (["parallel.cp=2"], "parallel.cp"),
    (["parallel.tp=2", "parallel.sequence_parallel=true", "data.seq_length=4095"], "data.seq_length"),
    (["parallel.dtype=fp32"], "parallel.dtype"),
    (["parallel.backend=fsdp", "parallel.ep=1"], "parallel.backend"),
])
def test_megatron_only_problems_name_the_key(overrides, key):
    # (packed rows with train.micro_batch_size=2 are fine: one thd row of 2 * data.seq_length tokens)
    assert not check_megatron_recipe(load_config(["recipe=qwen3_next_80b_lora", "data.pack=true",
                                                  "train.micro_batch_size=2", "train.global_batch_size=32"]))
    cfg = load_config(["recipe=qwen3_next_80b_lora", *overrides])
    problems = check_megatron_recipe(cfg)
    assert any(key in p for p in problems), problems
    with pytest.raises(UserError) as err:
        megatron_argv(cfg, {}, use_te=False, ckpt=checkpoint_plan(cfg), wandb_installed=False)
    assert key in err.value.message


def test_wandb_required_but_missing_names_the_key():
    cfg = load_config(["recipe=qwen3_next_80b_lora", "logging.wandb.enabled=true"])
    hf = validate_config(cfg, world_size=8)
    with pytest.raises(UserError, match="logging.wandb.enabled"):
        megatron_argv(cfg, hf, use_te=False, ckpt=checkpoint_plan(cfg), wandb_installed=False)


def test_layout_errors_come_from_our_validation_with_the_key():
    cfg = load_config(["recipe=qwen3_next_80b_lora"])
    with pytest.raises(UserError, match="parallel.ep"):
        validate_config(cfg, world_size=12)


def test_megatrons_own_rejection_becomes_a_user_error(tmp_path):
    _, argv = resolve(["recipe=qwen3_next_80b_lora", f"output_dir={tmp_path}/r"], 8)
    # a later flag wins in argparse: 8 processes cannot be split into tensor-parallel groups of 3
    with pytest.raises(UserError, match="megatron.training rejected.*world size"):
        parse_megatron_args(argv + ["--tensor-model-parallel-size", "3"], world_size=8)
