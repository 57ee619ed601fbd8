"""The recipe schema: every key a recipe may set, its type and its default.

Defaults live here and only here; YAML files under ``recipes/`` override them. An unknown key in
a YAML file or on the command line is an error (see ``load.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkvz", "in_proj_ba", "out_proj"]


@dataclass
class ModelConfig:
    name: str = "tiny_qwen3_next"
    # HF config.json describing the architecture (relative paths are relative to the repo root).
    hf_config: str = "models/tiny_qwen3_next/config.json"
    # HF checkpoint directory (safetensors + config + tokenizer); FSDP trains from it, `make convert` reads it.
    checkpoint: Optional[str] = None
    # Megatron torch_dist checkpoint to start from (Megatron backend).
    megatron_checkpoint: Optional[str] = None
    # Tokenizer directory; null = the built-in Qwen tokenizer (no download needed).
    tokenizer: Optional[str] = None


@dataclass
class LoraConfig:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    # HF module names; a name matches every module whose last path component equals it.
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    # Also adapt routed experts / the shared expert (gate_proj, up_proj, down_proj).
    experts: bool = False
    shared_expert: bool = False
    # Storage of the frozen routed experts (Megatron backend): bf16, fp8 (e4m3, one scale per row; half the
    # bytes) or nf4 (4-bit NormalFloat as in QLoRA, via torchao; about a quarter); loaded and quantized one
    # layer at a time (qnext.megatron.quant_load)
    base_dtype: str = "bf16"


@dataclass
class TrainConfig:
    mode: str = "lora"  # lora | full
    lora: LoraConfig = field(default_factory=LoraConfig)
    steps: int = 100
    global_batch_size: int = 8  # sequences per optimizer step, summed over data-parallel ranks
    micro_batch_size: int = 1  # sequences per forward/backward on one rank (Megatron, packed: one thd row of them all)
    lr: float = 2e-4
    min_lr: float = 2e-5
    warmup_steps: int = 10
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 1234
    log_every: int = 1
    eval_every: int = 0  # 0 = only at the end; > 0 also evaluates once before the first step (a baseline)
    eval_batches: int = 8
    save_every: int = 0  # 0 = only at the end
    keep_checkpoints: int = 2
    # false: no checkpoint and no final export at the end of the run (throughput benchmarks)
    save_final: bool = True
    check_disk: bool = True  # Megatron: refuse to start when one checkpoint cannot fit the output disk
    # stop after this many steps with a checkpoint (resume=auto continues the same schedule); 0 = run to train.steps
    stop_after: int = 0
    optimizer_cpu_offload: bool = False
    # torch's fused AdamW (one kernel, no temporaries) instead of its foreach Adam (which needs 4 B per
    # weight extra at each step): the FSDP backend, and Megatron without Transformer Engine/Apex; false keeps
    # torch's default (FSDP) or megatron's choice
    optimizer_fused: bool = True
    router_aux_loss_coef: Optional[float] = None  # null = the model config's value


@dataclass
class ParallelConfig:
    backend: str = "fsdp"  # megatron | fsdp
    device: str = "auto"  # auto | cuda | cpu
    dtype: str = "bf16"  # bf16 | fp32 (fp32 on CPU; bf16 needs a GPU for speed)
    tp: int = 1  # tensor parallel
    pp: int = 1  # pipeline parallel
    ep: int = 1  # expert parallel
    etp: int = 1  # expert tensor parallel
    cp: int = 1  # context parallel
    sequence_parallel: bool = False
    # auto: the Megatron backend takes the least recompute whose memory plan fits the GPU (qnext.plan.
    # choose_recompute; the FSDP backend does not recompute then) | none | experts_act | experts | selective | full
    recompute: str = "auto"
    num_gpus_per_node: int = 8
    num_nodes: int = 1
    memory_check: bool = True  # Megatron: refuse to start when the memory plan (qnext.plan) exceeds the GPU


@dataclass
class DataConfig:
    path: str = "data/sample/chats.jsonl"
    valid_path: Optional[str] = None  # null = split valid_fraction off `path`
    format: str = "chat_jsonl"
    seq_length: int = 512
    pack: bool = False
    valid_fraction: float = 0.05
    split_seed: int = 0
    overlong: str = "truncate"  # truncate | drop
    eval_prompts: Optional[str] = "data/sample/eval_prompts.jsonl"


@dataclass
class WandbConfig:
    enabled: str = "auto"  # auto (when installed) | true | false
    project: str = "qnext"
    mode: str = "auto"  # auto (online with WANDB_API_KEY, else offline) | online | offline


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress_bar: bool = True


@dataclass
class RecipeConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    output_dir: str = "runs/${model.name}-${train.mode}"
    overwrite: bool = False
    resume: str = "auto"  # auto (resume from output_dir if it has a checkpoint) | never | <checkpoint dir>
