"""The Megatron backend's forward step on the converted tiny checkpoint, on CPU (gloo world of one,
torch GDN path):

- the loss it reports is the cross-entropy summed over exactly the labelled tokens of the data
  module, checked against an independent reference (the model's logits scored HF-style: logits at
  t-1 against the unshifted label at t), and the count is the number of labelled tokens;
- the backward pass gives finite, non-zero gradients to every trained weight;
- the start-up check finds every model tensor in the converted checkpoint and names one that is not;
- the LoRA hook (with ``qnext.lora``) adds adapter tensors only and leaves the base keys alone.

Slow: imports megatron and builds the tiny model (about a minute on 2 cores).
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests/unit"))

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.slow

SEQ = 128


def build_loaded(cfg: dict, ckpt: Path):
    from qnext.megatron.model import build_model, load_torch_dist
    from qnext.megatron.parallel import CPU_BUILD_OVERRIDES, construction_device

    with construction_device("cpu"):
        model = build_model(cfg, None, torch.float32, use_te=False,
                            config_overrides={**CPU_BUILD_OVERRIDES, "deterministic_mode": True,
                                              "calculate_per_token_loss": True})
    load_torch_dist(model, ckpt)
    return model


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    from convert_fixtures import small_config, write_hf_checkpoint

    from qnext.convert import convert_hf_to_torch_dist
    from qnext.data.dataset import build_datasets
    from qnext.data.tokenizer import load_tokenizer
    from dist_fixtures import gloo_world_of_one

    base = tmp_path_factory.mktemp("fwd")
    cfg = small_config()
    hf = write_hf_checkpoint(base / "hf")
    convert_hf_to_torch_dist(hf, base / "mg", progress=False, log=None)
    gloo_world_of_one()
    model = build_loaded(cfg, base / "mg")
    tok = load_tokenizer(None)
    train, _, _ = build_datasets(REPO / "data/sample/chats.jsonl", tok, SEQ, pack=False, valid_fraction=0.05)
    vocab = cfg["vocab_size"]  # the fixture's small vocabulary: fold the real ids into it
    samples = [{**s, "input_ids": [t % vocab for t in s["input_ids"]],
                "labels": [t % vocab if t != -100 else t for t in s["labels"]]} for s in train[:4]]
    return model, samples, tok.pad_token_id % vocab, base / "mg", cfg


def reference_sum(model, samples, pad_id) -> tuple[float, int]:
    """HF convention on the same weights: logits at t-1 score the unshifted label at t."""
    from qnext.data.collate import collate

    from qnext.megatron.parallel import construction_device

    b = collate(samples, pad_id)
    with torch.no_grad(), construction_device("cpu"):
        logits = model(b["input_ids"], b["position_ids"], None).float()  # no labels: [b, s, vocab]
    labels = b["labels"][:, 1:]
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum",
                         ignore_index=-100)
    return float(ce), int((labels != -100).sum())


def test_reported_loss_is_the_sum_over_labelled_tokens_and_grads_flow(model_and_data):
    """forward_step + loss_func as megatron's schedule calls them (per micro-batch: output, then
    loss_func(output)). The schedule itself cannot run here: it allocates its token counter with
    device="cuda" (schedules.py, forward_backward_no_pipelining)."""
    from qnext.megatron.data import forward_step, megatron_batch, reduce_report
    from qnext.megatron.parallel import construction_device

    model, samples, pad_id, _, _ = model_and_data
    batches = [megatron_batch(samples[i:i + 2], pad_id, SEQ, pack=False) for i in (0, 2)]
    data = iter(batches)
    model.eval()
    reports = []
    with torch.no_grad(), construction_device("cpu"):  # megatron's RoPE asks for the CUDA device
        for _ in batches:
            output, loss_fn = forward_step(data, model)
            loss, count, report = loss_fn(output)
            assert float(loss) == float(report["lm loss"][0]) and int(count) == int(report["lm loss"][1])
            reports.append(report)
    got_sum, got_count = reduce_report(reports).tolist()
    want = [reference_sum(model, samples[i:i + 2], pad_id) for i in (0, 2)]
    want_sum, want_count = sum(w[0] for w in want), sum(w[1] for w in want)
    print(f"forward_step: sum {got_sum:.6f} over {got_count:.0f} tokens; reference: {want_sum:.6f} over {want_count}")
    assert got_count == want_count > 0
    assert got_sum == pytest.approx(want_sum, rel=1e-5)

    model.train()
    model.zero_grad(set_to_none=True)
    with construction_device("cpu"):
        output, loss_fn = forward_step(iter(batches[:1]), model)
        loss, count, _ = loss_fn(output)
        (loss / count).backward()  # what --calculate-per-token-loss makes of it after the step's token count
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    missing = [n for n, g in grads.items() if g is None]
    assert not missing, missing[:5]
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert float(grads["output_layer.weight"].abs().sum()) > 0


def test_every_linear_gets_an_input_matmul_folds_into_one_gemm(model_and_data):
    """One row per micro-batch (batch 1, the training entry's packed layout): the input of every linear
    layer has dense strides. megatron's GDN hands out_proj a [s, 1, h] view with the batch dimension's
    stride s*h (so does the embedding), which torch.matmul in the frozen-weight linear ran as s vector
    products (30% of the proxy's LoRA step on an H200); qnext.megatron.gemm_layout fixes it."""
    from qnext.megatron.data import forward_step, megatron_batch
    from qnext.megatron.gemm_layout import gemm_foldable, standard_strides
    from qnext.megatron.parallel import construction_device

    model, samples, pad_id, _, _ = model_and_data
    seen = {}

    def record(name):
        def hook(_mod, args):
            if args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 3:
                seen[name] = (tuple(args[0].shape), args[0].stride())
        return hook

    linears = [(n, m) for n, m in model.named_modules()
               if type(m).__name__ in ("ColumnParallelLinear", "RowParallelLinear")]
    handles = [m.register_forward_pre_hook(record(n)) for n, m in linears]  # run after the model's own hooks
    try:
        # one row (CPU: unpacked, megatron's torch GDN path refuses packed rows in deterministic mode)
        batch = megatron_batch(samples[:1], pad_id, SEQ, pack=False)
        with torch.no_grad(), construction_device("cpu"):
            forward_step(iter([batch]), model)
    finally:
        for h in handles:
            h.remove()
    assert any(n.endswith("self_attention.out_proj") for n in seen) and len(seen) == len(linears), sorted(seen)
    bad = {n: v for n, v in seen.items() if not gemm_foldable(torch.empty_strided(*v))}
    assert not bad, bad
    odd = torch.empty(1, 6, 4).transpose(0, 1)  # what megatron hands out_proj, in small
    assert odd.is_contiguous() and not gemm_foldable(odd)
    fixed = standard_strides(odd)
    assert fixed.stride() == (4, 4, 1) and fixed.data_ptr() == odd.data_ptr() and fixed.shape == odd.shape


def test_start_up_check_names_weights_missing_from_the_checkpoint(model_and_data):
    from qnext.megatron.checkpoint import checkpoint_tensor_keys, missing_base_keys

    model, _, _, ckpt, _ = model_and_data
    keys = checkpoint_tensor_keys(ckpt)
    assert missing_base_keys(model, keys) == []
    dropped = sorted(k for k in keys if k.endswith("self_attention.linear_proj.weight"))[0]
    assert missing_base_keys(model, keys - {dropped}) == [dropped]


def test_lora_hook_adds_adapters_only(model_and_data):
    """The training entry's LoRA hook with the real qnext.lora: base keys unchanged (megatron's load
    finds them), only adapters train, and at initialisation (B = 0) the loss is the base model's."""
    from qnext.config import load_config
    from qnext.megatron.checkpoint import model_tensor_keys
    from qnext.megatron.data import forward_step, megatron_batch
    from qnext.megatron.parallel import construction_device
    from qnext.megatron.provider import attach_lora

    base_model, samples, pad_id, ckpt, cfg = model_and_data
    model = build_loaded(cfg, ckpt)
    before = model_tensor_keys(model)
    attach_lora(model, load_config(["model=tiny_qwen3_next", "train=lora"]), cfg)
    from qnext.lora import lora_parameters

    after = model_tensor_keys(model)
    assert before <= after and len(after) > len(before)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable and trainable == {id(p) for p in lora_parameters(model)}

    batch = megatron_batch(samples[:2], pad_id, SEQ, pack=False)
    with construction_device("cpu"):
        base_model.eval()
        model.eval()
        with torch.no_grad():
            out, fn = forward_step(iter([batch]), base_model)
            want = float(fn(out)[0])
        model.train()
        out, fn = forward_step(iter([batch]), model)
        loss, count, _ = fn(out)
        (loss / count).backward()
    assert float(loss.detach()) == pytest.approx(want, rel=1e-6)
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert any(g is not None and float(g.abs().sum()) > 0 for g in grads)


@contextlib.contextmanager
def _cuda_allocations_on_cpu():
    """megatron's schedule allocates its token counter with ``device="cuda"``; answer those on the CPU."""
    plain = torch.zeros

    def zeros(*a, **k):
        if str(k.get("device", "")).startswith("cuda"):
            k["device"] = "cpu"
        return plain(*a, **k)

    torch.zeros = zeros
    try:
        yield
    finally:
        torch.zeros = plain


def test_folded_token_scale_gives_megatrons_per_token_gradients(model_and_data, monkeypatch):
    """One training step's gradients through megatron's own schedule (forward_backward_no_pipelining,
    DDP fp32 buffers, finalize_model_grads) with 1/N folded into the loss (qnext.megatron.token_scale,
    the default) against megatron's post-backward per-token scaling. Labels are dropped until N is a
    power of two: then both scalings are exact in floating point and every gradient must be identical,
    bit for bit (with N = 33 the GDN A_log/dt_bias sums, whose terms cancel, already differ by 1e-3 in
    fp32). The host's token count is the one the loss masks hold."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.pipeline_parallel.schedules import forward_backward_no_pipelining

    from qnext.megatron.compat.cpu import cpu_training
    from qnext.megatron.data import forward_step, megatron_batch
    from qnext.megatron.token_scale import FoldedTokenScale, global_loss_tokens, loss_token_count

    _, samples, pad_id, ckpt, cfg = model_and_data
    samples = [{**s, "labels": list(s["labels"])} for s in samples]
    n_host = global_loss_tokens(samples)
    drop = n_host - 2 ** (n_host.bit_length() - 1)
    for s in samples:  # unlabel the last labelled tokens until N = 2^k
        for t in reversed(range(1, len(s["labels"]))):
            if drop and s["labels"][t] != -100 and loss_token_count({**s, "labels": s["labels"][:t + 1]}) > 0:
                s["labels"][t], drop = -100, drop - 1
    n_host = global_loss_tokens(samples)
    assert n_host & (n_host - 1) == 0 and n_host >= 16, n_host
    model = build_loaded(cfg, ckpt)
    with cpu_training():
        ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=False, overlap_grad_reduce=False), model)
    ddp.train()
    config = model.config
    batches = [megatron_batch(samples[i:i + 2], pad_id, SEQ, pack=False) for i in (0, 2)]
    assert n_host == int(sum(b["loss_mask"].sum() for b in batches))

    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    def step() -> dict[str, torch.Tensor]:
        # the aux-loss scale is a class-wide tensor that earlier steps (other tests) may have made 0-d
        monkeypatch.setattr(MoEAuxLossAutoScaler, "main_loss_backward_scale", None)
        ddp.zero_grad_buffer()
        with cpu_training(), _cuda_allocations_on_cpu():
            forward_backward_no_pipelining(forward_step_func=forward_step, data_iterator=iter(batches), model=[ddp],
                                           num_microbatches=len(batches), seq_length=SEQ, micro_batch_size=2)
        return {n: p.main_grad.detach().clone() for n, p in ddp.module.named_parameters() if p.requires_grad}

    def unit_scale(loss):  # what a bf16 optimizer's scale_loss does (loss scale 1)
        return loss * 1.0

    config.grad_scale_func, config.finalize_model_grads_func = unit_scale, finalize_model_grads
    reference = step()
    # the CPU embedding backward adds in a thread-dependent order: megatron's own path differs from itself
    # there, sometimes (rel. 2e-8); every other tensor repeats bit for bit
    unstable = {"embedding.word_embeddings.weight"}
    assert {k for k, g in step().items() if not torch.equal(g, reference[k])} <= unstable
    folded_scale = FoldedTokenScale(config, unit_scale, finalize_model_grads)
    folded_scale.set_tokens(n_host)
    folded = step()
    assert config.grad_scale_func == folded_scale.scale
    assert reference.keys() == folded.keys() and len(reference) > 20
    assert all(float(g.norm()) > 0 for g in reference.values())
    differ = [k for k in reference if not torch.equal(folded[k], reference[k])]
    print(f"folded vs megatron's per-token scaling over {n_host} tokens: {len(differ)} of {len(reference)} tensors "
          f"differ ({sorted(differ)}; {sorted(unstable)} may differ from itself)")
    assert set(differ) <= unstable, sorted(set(differ) - unstable)[:5]
    for k in differ:
        assert float((folded[k] - reference[k]).norm() / reference[k].norm()) < 1e-6, k


def test_two_packed_rows_in_one_micro_batch_equal_two_micro_batches(model_and_data):
    """train.micro_batch_size=2 with data.pack: the rows go as ONE thd row of 2 * seq_length tokens (one
    forward, half the launches). The loss sum, its token count and every gradient equal those of the two
    rows as separate micro-batches: no attention, RoPE position or loss crosses the row boundary. An
    attention-only model: megatron's torch Gated DeltaNet (the CPU path) refuses packed rows; fla's, which
    takes the same cu_seqlens, is checked on GPUs (tests/gpu)."""
    from qnext.megatron.data import forward_step, megatron_batch
    from qnext.megatron.parallel import construction_device

    _, samples, pad_id, _, cfg = model_and_data
    n = cfg["num_hidden_layers"]
    # no load-balancing loss: it is a function of each micro-batch's routing statistics (megatron computes it
    # per micro-batch), so its gradient legitimately depends on how tokens are grouped into micro-batches
    attn_cfg = {**cfg, "layer_types": ["full_attention"] * n, "full_attention_interval": 1, "router_aux_loss_coef": 0.0}
    with construction_device("cpu"):
        from qnext.megatron.model import build_model
        from qnext.megatron.parallel import CPU_BUILD_OVERRIDES

        torch.manual_seed(0)
        model = build_model(attn_cfg, None, torch.float32, use_te=False,
                            config_overrides={**CPU_BUILD_OVERRIDES, "calculate_per_token_loss": True})
    with torch.no_grad():  # the CPU build leaves weights uninitialised
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    # two packed rows of two chats each (a chat boundary inside each row and one between the rows)
    ids = [t for s in samples for t in s["input_ids"]] * 2  # the fixture keeps 4 short chats
    assert len(ids) >= 180
    rows = [{"input_ids": ids[o:o + 90], "position_ids": list(range(40)) + list(range(50)), "seq_lens": [40, 50],
             "labels": [t if i % 3 else -100 for i, t in enumerate(ids[o:o + 90])]}  # labelled on both sides
            for o in (0, 90)]

    def run(batches):
        model.zero_grad(set_to_none=True)
        total, count = 0.0, 0
        with construction_device("cpu"):
            for b in batches:
                output, loss_fn = forward_step(iter([b]), model)
                loss, cnt, _ = loss_fn(output)
                loss.backward()
                total, count = total + float(loss), count + int(cnt)
        return total, count, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    together = megatron_batch(rows, pad_id, SEQ, pack=True)
    assert together["tokens"].shape == (1, 2 * SEQ)
    assert together["cu_seqlens"].tolist() == [0, 40, 90, SEQ, SEQ + 40, SEQ + 90, 2 * SEQ]
    s2, c2, g2 = run([together])
    s1, c1, g1 = run([megatron_batch([r], pad_id, SEQ, pack=True) for r in rows])
    print(f"packed rows: one micro-batch {s2:.6f} over {c2}; two micro-batches {s1:.6f} over {c1}")
    assert c2 == c1 > 0
    assert s2 == pytest.approx(s1, rel=1e-5)
    assert g2.keys() == g1.keys() and len(g1) > 10
    rel = {k: float((g2[k] - g1[k]).norm() / g1[k].norm().clamp_min(1e-30)) for k in g1}
    worst = max(rel, key=rel.get)
    print(f"largest gradient difference (relative L2): {rel[worst]:.2e} in {worst}")
    assert rel[worst] < 1e-5, (worst, rel[worst])
