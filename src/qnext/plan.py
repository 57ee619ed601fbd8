"""Memory planner for the Megatron backend: what one GPU holds for a recipe, before anything launches.

``plan(cfg)`` returns a :class:`Plan` with per-GPU bytes for weights, gradients, optimizer states,
LoRA, activations and buffers on the most loaded pipeline stage, plus the step's FLOPs. The model's
parameters are counted from the weight map's HF shapes (the exact tensors a checkpoint holds), split
the way megatron-core 0.19.2 splits them:

- embedding and LM head: vocabulary-parallel over TP, on the first / last pipeline stage;
- attention, Gated DeltaNet, shared expert: linear weights over TP (norms, router, biases replicated);
- routed experts: over EP x ETP; decoder layers over PP (the first and the last stage also hold the
  embedding and the head);
- ``train.mode=full``: bf16 weights (2 B) and the DDP gradient buffer on every GPU, which is fp32
  (4 B: megatron.training turns ``accumulate_allreduce_grads_in_fp32`` on for ``--bf16``; the main
  gradients are views into it), plus the distributed optimizer's fp32 main weights and two Adam
  moments (12 B) sharded over the data-parallel ranks (the expert-data-parallel ranks for experts);
  with ``train.optimizer_cpu_offload`` those live in host memory, with a host copy of the gradients
  (16 B);
- ``train.mode=lora``: bf16 frozen weights only; the adapters (r x (in + out) per targeted linear) get
  weights, gradients and optimizer states like full training.

Activations are an estimate per token and layer (bf16 tensors that autograd keeps, listed in
:func:`activation_bytes_per_token`), multiplied by the micro-batch tokens and the micro-batches in
flight (1 without PP; up to PP on the first stage under 1F1B). Recompute: ``selective`` drops the
attention core and the MoE block's saved tensors, ``full`` keeps one hidden state per layer.
Buffers: a fixed allowance for the CUDA context, NCCL and allocator slack (``BUFFER_BYTES``).

The activation model is an estimate, and measurements show it is short. On one H200 with the 4-layer
real-width proxy at 4096 tokens (benchmarks/results/train_throughput_h200_4layer/), the measured max
allocated was 26.6 GiB for LoRA against 16.9 GiB of planned tensors. Full training went out of memory at
134.5 GiB against 124.4 GiB planned. The weight, gradient and optimizer terms are exact counts, so about
10 GiB of activations and transients are not yet modelled. ``QNEXT_PROFILE_STEP`` is how to attribute them.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Optional

from .config import RecipeConfig
from .config.validate import load_hf_config
from .errors import UserError
from .quant.nf4 import BYTES_PER_VALUE as NF4_BYTES_PER_VALUE

GIB = 2**30
BUFFER_BYTES = int(3.0 * GIB)  # CUDA context + NCCL buffers + allocator slack (per GPU)
NF4_SCRATCH = 1.0 * GIB  # NF4 decoding of one chunk of experts (qnext.quant.nf4)
QUANT_SCRATCH = 0.75 * GIB  # FP8: fp32 temporaries of one chunk of rows (quantize) or its bf16 copy (dequantize)

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass
class ParamCounts:
    """Parameters by how they are split (whole model, before any parallelism)."""

    embedding: int = 0
    head: int = 0
    dense_split: list[int] = field(default_factory=list)  # per layer, split over TP
    dense_replicated: list[int] = field(default_factory=list)  # per layer, on every TP rank
    experts: list[int] = field(default_factory=list)  # per layer, split over EP x ETP
    final_norm: int = 0

    @property
    def total(self) -> int:
        return (self.embedding + self.head + self.final_norm + sum(self.dense_split) + sum(self.dense_replicated)
                + sum(self.experts))


def count_params(hf: Mapping[str, Any]) -> ParamCounts:
    """Parameter counts from the weight map's HF tensor shapes, bucketed by each rule's parallel split
    (``Rule.split``; no MTP block: it is not trained)."""
    from .models.qwen3_next import build_weight_map
    from .models.weight_map import EXPERT_PARALLEL, REPLICATED

    layers = int(hf["num_hidden_layers"])
    pc = ParamCounts(dense_split=[0] * layers, dense_replicated=[0] * layers, experts=[0] * layers)
    for m in build_weight_map(hf).mappings:
        for name, shape in zip(m.hf, m.hf_shapes):
            n = 1
            for s in shape:
                n *= int(s)
            if name == "model.embed_tokens.weight":
                pc.embedding += n
            elif name == "lm_head.weight":
                pc.head += n
            elif name == "model.norm.weight":
                pc.final_norm += n
            elif (layer := _LAYER.match(name)) is not None:  # else mtp.* (not in the training model)
                i = int(layer.group(1))
                if m.rule.split == EXPERT_PARALLEL:
                    pc.experts[i] += n
                elif m.rule.split == REPLICATED:
                    pc.dense_replicated[i] += n
                else:
                    pc.dense_split[i] += n
    return pc


_MEMO: dict[str, Any] = {}


def _memo(key: Any, compute):
    """Counts of one model (and LoRA setting) are computed once per process: the 80B weight map takes
    seconds to expand, and proposing layouts plans dozens of layouts of the same model."""
    k = json.dumps(key, sort_keys=True, default=str)
    if k not in _MEMO:
        _MEMO[k] = compute()
    return _MEMO[k]


def lora_params_per_layer(hf: Mapping[str, Any], cfg: RecipeConfig) -> list[int]:
    """Adapter parameters per layer (whole model): r x (in + out) for every targeted HF linear."""
    from .models.qwen3_next import build_weight_map

    lcfg = cfg.train.lora
    targets = set(lcfg.targets)
    layers = int(hf["num_hidden_layers"])
    out = [0] * layers
    for name, shape in build_weight_map(hf).hf_shapes.items():
        m = _LAYER.match(name)
        if m is None or len(shape) != 2 or not name.endswith(".weight"):
            continue
        module = name[: -len(".weight")]
        leaf = module.rsplit(".", 1)[-1]
        if ".mlp.experts." in module:
            hit = lcfg.experts and leaf in ("gate_proj", "up_proj", "down_proj")
        elif ".shared_expert." in module:
            hit = lcfg.shared_expert and leaf in ("gate_proj", "up_proj", "down_proj")
        else:
            hit = leaf in targets
        if hit:
            out[int(m.group(1))] += lcfg.r * (int(shape[0]) + int(shape[1]))
    return out


def activation_bytes_per_token(hf: Mapping[str, Any], layer_type: str, recompute: str, frozen_experts: bool = False,
                               regather: bool = False) -> int:
    """bf16 bytes kept for the backward pass per token in one decoder layer (estimate). ``frozen_experts``
    (LoRA without expert adapters): autograd keeps a matmul's input only for its weight's gradient, so the
    routed experts' dispatched tokens and fc2 inputs are not kept (SwiGLU keeps its fc1 output). ``regather``
    (every expert on the GPU, qnext's sorted dispatcher): the dispatched tokens are gathered again for fc1's
    weight gradient instead of kept (``qnext.megatron.regather``)."""
    h = int(hf["hidden_size"])
    topk, f = int(hf.get("num_experts_per_tok", 0)), int(hf.get("moe_intermediate_size", 0))
    fs, experts = int(hf.get("shared_expert_intermediate_size", 0)), int(hf.get("num_experts", 0))
    if recompute == "full":
        return 2 * h  # the layer input only
    b = 2 * (2 * h)  # the two norm inputs
    if layer_type == "full_attention":
        hq, hkv, d = int(hf["num_attention_heads"]), int(hf["num_key_value_heads"]), int(hf["head_dim"])
        proj = 2 * (2 * hq * d + 2 * hkv * d)  # q (with gate) / k / v outputs
        core = 2 * (hq * d) * 2  # attention output and gated output (flash/SDPA keep no T x T matrix)
        b += proj + (0 if recompute == "selective" else core) + 2 * hq * d  # o_proj input
    else:
        hk, hv = int(hf["linear_num_key_heads"]), int(hf["linear_num_value_heads"])
        dk, dv = int(hf["linear_key_head_dim"]), int(hf["linear_value_head_dim"])
        qkvz = 2 * hk * dk + 2 * hv * dv
        b += 2 * (qkvz + 2 * hv)  # in_proj outputs (qkvz, ba)
        b += 2 * (2 * hk * dk + hv * dv) * 2  # conv input and output
        b += 2 * hv * dv * 3  # chunked rule output, gated-norm input and output (out_proj input)
    moe = 4 * experts + topk * 2 * (h + 3 * f) + 2 * (3 * fs)  # router logits (fp32), dispatched tokens, FFNs
    if recompute == "experts":  # the routed experts recomputed: only their input is kept, where it is not regathered
        moe -= topk * 2 * (3 * f) + (topk * 2 * h if regather else 0)
    else:
        if recompute == "experts_act" or frozen_experts:
            moe -= topk * 2 * f  # the routed experts' activation output (fc2's input): recomputed, or not kept
        if frozen_experts or regather:
            moe -= topk * 2 * h  # the dispatched tokens (fc1's input)
    b += 0 if recompute == "selective" else moe
    return b


def _regather_applies() -> bool:
    """Whether the sorted dispatcher and its regathered expert input are switched on (they apply at EP = ETP = 1)."""
    from .megatron.dispatch import dispatch_mode
    from .megatron.regather import regather_enabled

    return dispatch_mode() == "sorted" and regather_enabled()


@dataclass
class Plan:
    """Per-GPU bytes on the most loaded pipeline stage, and the step's FLOPs."""

    weights: int
    grads: int
    optimizer: int
    lora: int
    activations: int
    buffers: int
    params_total: int
    params_per_gpu: int
    step_flops: float
    layout: str
    notes: list[str] = field(default_factory=list)
    step_temp: int = 0  # optimizer-step temporaries (torch's foreach Adam); alive when activations are not
    # start-up: what is allocated when megatron loads the checkpoint (weights, gradient buffer, fp32 main
    # weights; Adam's moments come with the first step) plus one staged tensor (the load fills the model's own)
    load: int = 0

    @property
    def step_peak(self) -> int:
        """A training step: every resident tensor plus the larger of activations and step temporaries."""
        return (self.weights + self.grads + self.optimizer + self.lora + self.buffers
                + max(self.activations, self.step_temp))

    @property
    def peak(self) -> int:
        """The larger of the start-up (checkpoint load) and the step peak."""
        return max(self.step_peak, self.load + self.buffers)

    def table(self) -> str:
        rows = [("weights", self.weights), ("gradients", self.grads), ("optimizer states", self.optimizer),
                ("LoRA (weights, grads, states)", self.lora), ("activations", self.activations),
                ("optimizer step temporaries", self.step_temp),
                ("buffers (context, NCCL, slack)", self.buffers), ("peak of a step", self.step_peak),
                ("start-up peak (checkpoint load)", self.load + self.buffers), ("peak per GPU", self.peak)]
        lines = [f"layout: {self.layout}",
                 f"parameters: {self.params_total / 1e9:.2f} B in the model, {self.params_per_gpu / 1e9:.2f} B on the most loaded GPU",
                 f"step: {self.step_flops / 1e15:.2f} PFLOP"]
        lines += [f"  {name:32s} {nbytes / GIB:8.2f} GiB" for name, nbytes in rows]
        notes = list(self.notes)
        if self.step_temp:
            notes.append("the peak counts the larger of activations and optimizer step temporaries (one follows the other)")
        return "\n".join(lines + [f"note: {n}" for n in notes])


def plan(cfg: RecipeConfig, world_size: int | None = None, fused_adam: Optional[bool] = None) -> Plan:
    """The memory plan of ``cfg`` on ``world_size`` GPUs (default: the recipe's nodes x GPUs per node).

    ``fused_adam``: whether the optimizer step is a fused kernel (Transformer Engine's or Apex's FusedAdam,
    which megatron-core picks when they import) or torch's foreach Adam, which allocates a square root of
    every second moment it updates at once (4 B per optimizer-local weight; measured: the out-of-memory of
    the full 4-layer proxy on one H200 was inside ``torch._foreach_sqrt``). Default: fused when
    ``train.optimizer_fused`` (torch's fused AdamW, the Megatron entry's default) or Transformer Engine
    imports here."""
    from .models.qwen3_next import Qwen3NextDims
    from .throughput import step_flops as model_step_flops

    if cfg.parallel.recompute == "auto":  # callers normally resolve it first (resolve_recompute)
        cfg = resolve_recompute(cfg, world_size, None, fused_adam)[0]
    hf = load_hf_config(cfg)
    if fused_adam is None:
        from .megatron.spec import te_importable

        fused_adam = cfg.train.optimizer_fused or te_importable()
    p, t, d = cfg.parallel, cfg.train, cfg.data
    world = world_size or p.num_nodes * p.num_gpus_per_node
    tp, pp, ep, etp, cp = p.tp, p.pp, p.ep, p.etp, p.cp
    dp = max(1, world // (tp * pp * cp))
    edp = max(1, world // (ep * etp * pp))
    pc = _memo(("count", hf), lambda: count_params(hf))
    layers = int(hf["num_hidden_layers"])
    per_stage = layers // pp
    types = list(Qwen3NextDims.from_hf_config(hf).layer_types)
    lora = t.mode == "lora"
    lora_layer = _memo(("lora", hf, asdict(t.lora)), lambda: lora_params_per_layer(hf, cfg)) if lora else [0] * layers

    # frozen routed experts quantized (train.lora.base_dtype): FP8 is 1 B per value plus an fp32 scale per row
    # (fc1 rows hold hidden values, fc2 rows moe_intermediate values); NF4 is 4 bits plus an int8 scale per 64
    # values and an fp32 factor per 256 scales. The forward and backward dequantize one layer's experts at a
    # time (bf16, fc1 and fc2); NF4's dequantization (torchao) also needs ~1 GiB of scratch per chunk
    base = t.lora.base_dtype if lora else "bf16"
    quantized = base != "bf16"
    h_, f_ = int(hf["hidden_size"]), int(hf.get("moe_intermediate_size") or 1)
    expert_bytes = {"fp8": (2 * (1 + 4 / h_) + (1 + 4 / f_)) / 3, "nf4": NF4_BYTES_PER_VALUE}.get(base, 2.0)
    one_layer_bf16 = 2 * max(pc.experts) / (ep * etp) if quantized and pc.experts else 0.0
    scratch = NF4_SCRATCH if base == "nf4" else QUANT_SCRATCH if quantized else 0.0
    largest = 2 * max(pc.embedding, pc.head) / tp  # bytes of the biggest single (bf16) tensor a load may stage
    regather = ep * etp == 1 and _regather_applies()
    best = None
    for stage in range(pp):
        idx = range(stage * per_stage, (stage + 1) * per_stage)
        dense = sum(pc.dense_split[i] for i in idx) / tp + sum(pc.dense_replicated[i] for i in idx)
        dense += (pc.embedding / tp if stage == 0 else 0) + (pc.head / tp + pc.final_norm if stage == pp - 1 else 0)
        expert = sum(pc.experts[i] for i in idx) / (ep * etp)
        n_lora = sum(lora_layer[i] for i in idx) / tp
        inflight = min(pp - stage, max(1, t.global_batch_size // (t.micro_batch_size * dp))) if pp > 1 else 1
        tokens = t.micro_batch_size * d.seq_length / (cp * (tp if p.sequence_parallel else 1))
        act = sum(activation_bytes_per_token(hf, types[i], p.recompute, frozen_experts=lora and not t.lora.experts,
                                             regather=regather) for i in idx) * tokens * inflight
        logits = 0.0
        if stage == pp - 1:
            # the bf16 logits and, with the vocabulary split over TP ranks, megatron's fp32 copy (vocab-parallel
            # cross entropy); on one TP rank fla's fused loss (qnext.megatron.lm_loss, the default) writes the logit
            # gradient over the logits: 2 B per logit. Measured on one H200 (4-layer proxy LoRA, 8192 tokens): the
            # peak fell by 2.3 GiB = 2 B x 8192 x 151,936 when the gradient stopped being a second tensor
            logits = t.micro_batch_size * d.seq_length / cp * int(hf["vocab_size"]) / tp * (2 + (4 if tp > 1 else 0))
        # the dequantized weights of the layer being computed: never alive with the loss's tensors (the peak
        # with every layer's activations), so they add only what they exceed those by (FP8/NF4 proxy, 1 H200)
        act += max(logits, one_layer_bf16 + scratch)
        weights = 2 * dense + expert_bytes * expert
        opt_full = 12 * (dense / dp + expert / edp)
        host_full = 16 * (dense / dp + expert / edp)  # with CPU offload: main weights, moments, grads
        if lora:
            grads, opt = 0.0, 0.0
            lora_b = n_lora * (2 + 4) + n_lora * 12 / dp
        else:
            grads = 4 * (dense + expert)
            opt = 0.0 if t.optimizer_cpu_offload else opt_full
            lora_b = 0.0
        local_opt = dense / dp + expert / edp
        if lora:
            step_temp = 0.0 if fused_adam else 4 * n_lora / dp
        else:
            step_temp = 0.0 if fused_adam or t.optimizer_cpu_offload else 4 * local_opt
        # checkpoint load: torch_dist loads every tensor into the model's own (experts: _make_merge_fn), so the
        # start-up peak is the weights, the DDP gradient buffer and, for full training, the fp32 main weights,
        # plus one staged tensor at most (measured on one H200, the LoRA 4-layer proxy: 13.6 GiB at start-up
        # against 13.4 GiB of bf16 weights; the former second copy planned 26.9 GiB). Quantized experts come
        # one layer at a time in bf16 (quant_load) and are quantized from there: one layer's bf16 experts and the
        # quantizer's temporaries above the rest (measured on one H200: 3.1 GiB for the NF4 proxy, 2.3 GiB for the
        # 80B FP8 config, one layer's bf16 experts being 3.0 GiB in both; two layers' were planned before)
        load = weights + grads + (4 * local_opt if not lora and not t.optimizer_cpu_offload else 0.0) + lora_b + largest
        if quantized:
            load += one_layer_bf16 + scratch
        total = max(weights + grads + opt + lora_b + max(act, step_temp), load)
        if best is None or total > best[0]:
            best = (total, weights, grads, opt, lora_b, act, dense + expert, host_full, step_temp, load)
    _, weights, grads, opt, lora_b, act, n_gpu, host_full, step_temp, load = best
    # full sequences (packed data fills them); LoRA: no weight gradients of frozen weights, plus the
    # adapters' own 3 passes
    step_flops = model_step_flops(hf, [d.seq_length] * t.global_batch_size, lora)
    if lora:
        step_flops += 3 * 2 * sum(lora_layer) * t.global_batch_size * d.seq_length
    layout = f"{world} GPUs: tp {tp} pp {pp} ep {ep} etp {etp} cp {cp} dp {dp}; {t.mode}; recompute {p.recompute}"
    if quantized:
        layout += f"; {base} experts"
    notes = []
    if not lora and t.optimizer_cpu_offload:
        notes.append(f"optimizer states in host memory: {host_full / GIB:.1f} GiB per GPU's process (fp32 main weights, Adam moments, gradients)")
    pl = Plan(int(weights), int(grads), int(opt), int(lora_b), int(act), BUFFER_BYTES, pc.total, int(n_gpu),
              step_flops, layout, notes, int(step_temp), int(load))
    if pl.load + pl.buffers > pl.step_peak:
        notes.append("the start-up peak (weights, buffers and one staged tensor while the checkpoint loads) exceeds a step's")
    return pl


RECOMPUTE_ORDER = ("none", "experts_act", "experts", "selective", "full")  # least recomputation (fastest step) first
# a level is chosen when its planned peak (allowances included) is within this share of the GPU. Measured on one
# H200 (139.8 GiB), full training of the 4-layer proxy at 2 x 4096 tokens per micro-batch: without recompute the
# step allocated 130.9 GiB (94%) and the caching allocator ran short and synchronized, 1.317 s per step against
# 1.218 s with selective recompute at 126.5 GiB (90%; speed_h200_2026-12-04/, sections 8-9). With 0.95 and the
# planner's 2 B per logit, auto would pick the slower level there
AUTO_HEADROOM = 0.92
DEFAULT_GPU_BYTES = 80 * GIB  # for recompute=auto where no GPU is visible (planning on a CPU)


def choose_recompute(cfg: RecipeConfig, world_size: int | None, gpu_mem_bytes: Optional[float],
                     fused_adam: Optional[bool] = None) -> tuple[str, str]:
    """``parallel.recompute=auto`` made concrete: the first of none, selective, full whose planned peak
    fits ``AUTO_HEADROOM`` of the GPU (full when none does). Returns the level and why. A recipe that sets
    the level keeps it. LoRA trains no weights, so its activations are the whole memory question and a
    one-GPU LoRA run usually needs no recompute at all (the MoE block, the biggest thing selective
    recompute repeats, then runs once)."""
    from dataclasses import replace

    if cfg.parallel.recompute != "auto":
        return cfg.parallel.recompute, "set by the recipe"
    mem = gpu_mem_bytes or DEFAULT_GPU_BYTES
    peaks = []
    for level in RECOMPUTE_ORDER:
        pl = plan(replace(cfg, parallel=replace(cfg.parallel, recompute=level)), world_size, fused_adam)
        peaks.append(f"{level} {pl.peak / GIB:.1f}")
        if pl.peak <= AUTO_HEADROOM * mem:
            return level, (f"recompute=auto -> {level}: the least recompute whose planned peak fits "
                           f"{AUTO_HEADROOM:.0%} of {mem / GIB:.0f} GiB (GiB planned: {', '.join(peaks)})")
    return "full", f"recompute=auto -> full: no level fits {mem / GIB:.0f} GiB (GiB planned: {', '.join(peaks)})"


def resolve_recompute(cfg: RecipeConfig, world_size: int | None, gpu_mem_bytes: Optional[float],
                      fused_adam: Optional[bool] = None) -> tuple[RecipeConfig, str]:
    """``cfg`` with ``parallel.recompute`` concrete (``choose_recompute``), and the reason."""
    from dataclasses import replace

    level, why = choose_recompute(cfg, world_size, gpu_mem_bytes, fused_adam)
    return replace(cfg, parallel=replace(cfg.parallel, recompute=level)), why


def check_fits(cfg: RecipeConfig, pl: Plan, gpu_mem_bytes: float, gpus: int) -> Optional[str]:
    """The start-up check of the Megatron entry: ``None`` when the planned peak fits ``gpu_mem_bytes``,
    a warning when it is within 10% of it, and a :class:`UserError` (the plan, layouts that fit, how to
    override) when it does not fit and ``parallel.memory_check`` is on."""
    if pl.peak <= 0.9 * gpu_mem_bytes:
        return None
    need, have = pl.peak / GIB, gpu_mem_bytes / GIB
    if pl.peak <= gpu_mem_bytes:
        return f"memory plan: {need:.1f} GiB of {have:.1f} GiB per GPU planned; little headroom (the plan is an estimate)"
    if not cfg.parallel.memory_check:
        return (f"memory plan: {need:.1f} GiB per GPU planned, more than the GPU's {have:.1f} GiB; starting anyway "
                "(parallel.memory_check=false)")
    fits = propose_layouts(cfg, gpus, gpu_mem_bytes)
    options = "; ".join(" ".join(f"parallel.{k}={v}" for k, v in lay.items() if k in ("tp", "pp", "ep"))
                        + f" ({p.peak / GIB:.1f} GiB)" for lay, p in fits[:3])
    hint = (f"layouts that fit {gpus} GPUs of {have:.0f} GiB: {options}" if options else
            "no TP/PP/EP layout fits these GPUs: use LoRA, train.optimizer_cpu_offload=true, parallel.recompute=full, "
            "a shorter data.seq_length or more GPUs")
    raise UserError(f"the memory plan needs {need:.1f} GiB per GPU, the GPU has {have:.1f} GiB:\n{pl.table()}",
                    hint=hint + " (or parallel.memory_check=false to start anyway: the plan is an estimate; "
                    f"see `make plan RECIPE=... GPUS={gpus} GPU_MEM={have:.0f}`)")


def propose_layouts(cfg: RecipeConfig, gpus: int, gpu_mem_bytes: float, limit: int = 5) -> list[tuple[dict, Plan]]:
    """Layouts (tp, pp, ep, etp=1, cp=1) valid for the model on ``gpus`` GPUs whose planned peak fits,
    fewest pipeline stages and smallest TP first (the least communication)."""
    from dataclasses import replace

    from .config.validate import check_divisibility

    hf = load_hf_config(cfg)
    experts = int(hf.get("num_experts", 1)) or 1
    found = []
    for pp in (d for d in range(1, gpus + 1) if gpus % d == 0):
        for tp in (d for d in (1, 2, 4, 8) if (gpus // pp) % d == 0):
            for ep in (d for d in range(1, gpus // pp + 1) if (gpus // pp) % d == 0 and experts % d == 0):
                if check_divisibility(hf, tp, ep, pp, 1):
                    continue
                dp = gpus // (tp * pp)
                if cfg.train.global_batch_size % (cfg.train.micro_batch_size * dp):
                    continue
                layout = dict(tp=tp, pp=pp, ep=ep, etp=1, cp=1)
                c = replace(cfg, parallel=replace(cfg.parallel, **layout, num_nodes=1, num_gpus_per_node=gpus))
                pl = plan(c, world_size=gpus)
                if pl.peak <= gpu_mem_bytes:
                    found.append((layout, pl))
    found.sort(key=lambda x: (x[0]["pp"], x[0]["tp"], -x[0]["ep"]))
    return found[:limit]
