"""The report of ``train_throughput.py``: its JSON rendered as a Markdown table (ratios to the HF pipeline,
targets, planner errors, the EP emulation's all-to-all estimate, failed runs) and a PNG chart."""
from __future__ import annotations

from pathlib import Path

from qnext.fsutil import atomic_write_text

APPROACHES = ("megatron", "fsdp", "hf")
MODES = ("lora", "full")
LABEL = {"megatron": "Megatron backend (this repo)", "fsdp": "FSDP backend (this repo)",
         "hf": 'HF device_map="auto" pipeline'}
TARGET_RATIO = {"lora": 2.0, "full": 1.5}  # Megatron tokens/s over the HF pipeline's, one GPU


def render(data: dict, out_dir: Path) -> None:
    env, rows = data["environment"], data["runs"]
    hf_rows = {r["mode"]: r for r in rows if r["approach"] == "hf" and "tokens_per_s_per_gpu" in r}
    lines = [f"# Training throughput: {env['model']} ({env['date']}, {env['gpus']}x {env['gpu']})", "",
             f"Command: `{env['command']}`", "",
             f"Software: {env.get('software', '')}. bf16 matmul peak measured in this run: "
             f"{env['matmul_peak_tflops']:.0f} TFLOP/s ({env.get('matmul_shape', '')}); datasheet "
             f"{env.get('datasheet_peak_tflops') or 'n/a'} TFLOP/s.", "",
             f"Per step: {env['gbs']} packed sequences of {env['seq']} tokens (micro-batch {env.get('mbs', 1)}); means over steps "
             f"{env['warmup'] + 1}-{env['steps']}. TFLOP/s are model FLOPs (`qnext.throughput`; LoRA 2 passes, full 3; "
             "recompute not counted). Peak memory: max allocated per GPU in the timed steps (each step's own peak). Planner: `qnext.plan` for the same recipe, "
             "its tensors (peak less the 3 GiB context/NCCL/slack allowance) against the measured max allocated.", "",
             "| approach | mode | layout | step s (median) | tokens/s/GPU | TFLOP/s/GPU | MFU (measured peak) | MFU (datasheet) "
             "| peak GiB/GPU allocated (reserved) | planned GiB (err) | vs HF pipeline |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        name = LABEL.get(r["approach"], r["approach"])
        if "error" in r and "step_time_s" not in r:
            lines.append(f"| {name} | {r['mode']} | {r.get('layout', '')} | — | — | — | — | — | — | "
                         f"{_planned(r)} | {r['error']} |")
            continue
        ref = hf_rows[r["mode"]]["tokens_per_s_per_gpu"] if r["mode"] in hf_rows else None
        speed = f"{r['tokens_per_s_per_gpu'] / ref:.1f}x" if ref and r["approach"] != "hf" else ""
        ds = env.get("datasheet_peak_tflops")
        lines.append(
            f"| {name} | {r['mode']} | {r.get('layout', '')} | {r['step_time_s']:.3f}"
            f"{' (%.3f)' % r['step_time_median_s'] if r.get('step_time_median_s') else ''} | {r['tokens_per_s_per_gpu']:,.0f} | "
            f"{r['tflops_per_gpu']:.1f} | {100 * r['mfu_measured_peak']:.1f}% | "
            f"{(100 * r['tflops_per_gpu'] / ds) if ds else float('nan'):.1f}% | {r['peak_mem_gib']:.1f}"
            f"{' (%.1f)' % r['peak_reserved_gib'] if r.get('peak_reserved_gib') else ''} | "
            f"{_planned(r)} | {speed} |")
    lines += ["", "Targets: Megatron backend >= 2x the HF pipeline's tokens/s for LoRA and >= 1.5x for full training; "
                  "FSDP backend >= 1x for LoRA; planner within 15% of the measured peak. tokens/s: the mean of the "
                  "timed steps' rates; the median step's rate is checked too."]
    for mode in MODES:
        mg = next((r for r in rows if r["approach"] == "megatron" and r["mode"] == mode and "tokens_per_s_per_gpu" in r
                   and r.get("base_dtype", "bf16") == "bf16"), None)  # the ratio and plan checks: the bf16 base
        hf = hf_rows.get(mode)
        for ours, want in ((mg, TARGET_RATIO[mode]), (_fsdp_row(rows, mode) if mode == "lora" else None, 1.0)):
            if ours and hf:  # met only when both the means and the median steps say so
                ratio = ours["tokens_per_s_per_gpu"] / hf["tokens_per_s_per_gpu"]
                med = _median_ratio(ours, hf)
                ok = ratio >= want and (med is None or med >= want)
                lines.append(f"- {mode}: {LABEL[ours['approach']].split(' (')[0]} / HF pipeline = {ratio:.2f}x"
                             + (f" (median steps {med:.2f}x)" if med is not None else "")
                             + f" ({'met' if ok else 'NOT met'}, target {want}x).")
        if mg and mg.get("planned_tensors_gib"):
            err = mg["planned_tensors_gib"] / mg["peak_mem_gib"] - 1
            lines.append(f"- {mode}: planner {mg['planned_tensors_gib']:.1f} GiB of tensors vs {mg['peak_mem_gib']:.1f} GiB "
                         f"measured max allocated ({100 * err:+.0f}%, {'met' if abs(err) <= 0.15 else 'NOT met'}); "
                         f"planned peak with the context/NCCL/slack allowance {mg['planned_peak_gib']:.1f} GiB.")
        if mg and mg.get("planned_load_tensors_gib") and mg.get("startup_peak_gib"):
            err = mg["planned_load_tensors_gib"] / mg["startup_peak_gib"] - 1
            lines.append(f"- {mode}: start-up (checkpoint load) planned {mg['planned_load_tensors_gib']:.1f} GiB vs "
                         f"{mg['startup_peak_gib']:.1f} GiB measured before step 1 ({100 * err:+.0f}%, "
                         f"{'met' if abs(err) <= 0.15 else 'NOT met'}).")
    for r in rows:
        if r.get("a2a_estimate_s") is not None and r.get("step_time_s"):
            with_a2a = r["tokens_per_s_per_gpu"] * r["step_time_s"] / (r["step_time_s"] + r["a2a_estimate_s"])
            lines.append(f"- {r['mode']}: one EP{r['emulated_ep']} rank of the full model emulated on one GPU; it leaves out "
                         f"{r['emulation_leaves_out']}. All-to-all estimate {1e3 * r['a2a_estimate_s']:.0f} ms per step "
                         f"({r['a2a_bytes_per_step'] / 1e9:.1f} GB sent at {r['a2a_assumed_gbps_one_way']:.0f} GB/s, a lower "
                         f"bound): {with_a2a:,.0f} tokens/s/GPU with it added unoverlapped.")
    quant = [r for r in rows if r["approach"] == "megatron" and r["mode"] == "lora" and r.get("eval_loss") is not None]
    base = next((r for r in quant if r.get("base_dtype", "bf16") == "bf16"), None)
    if base and len(quant) > 1:  # quantized frozen experts against the bf16 base, same data and steps
        lines += ["", "Frozen experts quantized (LoRA), against the bf16 base of the same run settings "
                      "(target: held-out loss within 2%):", "",
                  "| base | tokens/s/GPU | train loss, first -> last | held-out loss | vs bf16 |", "|---|---:|---|---:|---:|"]
        for r in quant:
            curve = r.get("loss_curve") or [float("nan")]
            rel = r["eval_loss"] / base["eval_loss"] - 1
            lines.append(f"| {r.get('base_dtype', 'bf16')} | {r.get('tokens_per_s_per_gpu', float('nan')):,.0f} | "
                         f"{curve[0]:.3f} -> {curve[-1]:.3f} | {r['eval_loss']:.4f} | {100 * rel:+.2f}% |")
    fails = [r for r in rows if r.get("error")]
    if fails:
        lines += ["", "Failed runs (last lines of their logs are in the JSON):"]
        lines += [f"- {LABEL.get(r['approach'])} {r['mode']}: {r['error']}" for r in fails]
    atomic_write_text(out_dir / "train_throughput.md", "\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[bench] matplotlib not installed: no chart (run --render on a machine with it)")
        return
    ok = [r for r in rows if "tokens_per_s_per_gpu" in r]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "tokens_per_s_per_gpu", "tokens/s per GPU"), (axes[1], "mfu_measured_peak", "MFU (measured peak)")):
        for j, mode in enumerate(MODES):
            xs = [i + (j - 0.5) * 0.38 for i, a in enumerate(APPROACHES)]
            vals = [next((r[key] * (100 if key.startswith("mfu") else 1) for r in ok if r["approach"] == a and r["mode"] == mode), 0)
                    for a in APPROACHES]
            bars = ax.bar(xs, vals, width=0.38, label=mode)
            ax.bar_label(bars, fmt="%.0f" if key.startswith("tokens") else "%.1f%%", fontsize=8)
        ax.set_xticks(range(len(APPROACHES)), [LABEL[a].replace(" + ", "\n+ ").replace(" (", "\n(") for a in APPROACHES], fontsize=8)
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"{env['model']}, {env['gpus']}x {env['gpu']}, seq {env['seq']}, {env['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_dir / "train_throughput.png", dpi=110)


def _fsdp_row(rows: list[dict], mode: str) -> dict | None:
    return next((r for r in rows if r["approach"] == "fsdp" and r["mode"] == mode and "tokens_per_s_per_gpu" in r), None)


def _median_ratio(ours: dict, hf: dict) -> float | None:
    if ours.get("tokens_per_s_median_per_gpu") and hf.get("tokens_per_s_median_per_gpu"):
        return ours["tokens_per_s_median_per_gpu"] / hf["tokens_per_s_median_per_gpu"]
    return None


def _planned(r: dict) -> str:
    """The planner's tensor estimate (its peak less the context/NCCL/slack allowance) and its error
    against the measured max allocated memory."""
    if not r.get("planned_tensors_gib"):
        return "n/a"
    if not r.get("peak_mem_gib"):
        return f"{r['planned_tensors_gib']:.1f}"
    return f"{r['planned_tensors_gib']:.1f} ({100 * (r['planned_tensors_gib'] / r['peak_mem_gib'] - 1):+.0f}%)"
