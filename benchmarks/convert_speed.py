#!/usr/bin/env python
"""Conversion speed and memory on a synthetic checkpoint with Qwen3-Next-80B-A3B's real widths.

Builds an HF checkpoint (hidden 2048, 512 experts, 16/2 attention heads, 16/32 GDN heads, vocab
151936; ``--layers`` layers: GDN layers and a final gated-attention layer; hub-like ~4 GB shards),
then in one run times:
  copy     plain copy of the same shard files (shutil.copyfile + fsync): the I/O baseline
  convert  tools/convert_hf_to_torch_dist.py as a subprocess (peak RSS from wait4's ru_maxrss)
  export   tools/convert_torch_dist_to_hf.py back to HF (reported, no target)
and checks the targets: convert >= 0.5x copy throughput, convert peak RSS < two largest shards + 1 GB.
Writes benchmarks/results/convert_speed.{json,md}; deletes every synthetic file at the end.

  python benchmarks/convert_speed.py                 # ~11 GB synthetic (3 layers), ~35 GB disk peak
  python benchmarks/convert_speed.py --layers 2 --workdir /scratch
"""
from __future__ import annotations

import argparse
import json
import math
import re
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402

from qnext.convert.safetensors_io import ShardWriter, write_index  # noqa: E402
from qnext.models.qwen3_next import build_weight_map  # noqa: E402

GB = 1e9


def synthetic_config(layers: int, experts: int = 512) -> dict:
    cfg = json.loads((REPO / "models/qwen3_next_80b_a3b/config.json").read_text())
    types = ["linear_attention"] * (layers - 1) + ["full_attention"]
    cfg.update(num_hidden_layers=layers, layer_types=types, torch_dtype="bfloat16", num_experts=experts)
    return cfg


def write_synthetic(out: Path, cfg: dict, shard_bytes: int) -> list[Path]:
    """Hub layout, bf16, filled from a 64 MB random block (content does not matter for speed)."""
    wm = build_weight_map(cfg, mtp_layers=0)
    names = list(wm.hf_shapes)
    block = torch.randint(-(2**15), 2**15, (32 * 2**20,), dtype=torch.int16).view(torch.bfloat16)
    groups: list[list[str]] = [[]]
    size = 0
    for n in names:
        b = math.prod(wm.hf_shapes[n]) * 2
        if groups[-1] and size + b > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(n)
        size += b
    out.mkdir(parents=True)
    files, weight_map, total = [], {}, 0
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        w = ShardWriter(out / fname, [(n, torch.bfloat16, wm.hf_shapes[n]) for n in group], {"format": "pt"})
        for n in group:
            numel = math.prod(wm.hf_shapes[n])
            reps = -(-numel // block.numel())
            t = block.repeat(reps)[:numel] if reps > 1 else block[:numel]
            w.write(n, t.reshape(wm.hf_shapes[n]))
            weight_map[n] = fname
            total += numel * 2
        w.close()
        files.append(out / fname)
    write_index(out / "model.safetensors.index.json", weight_map, total)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return files


def timed_copy(files: list[Path], dst: Path) -> float:
    dst.mkdir()
    t0 = time.perf_counter()
    for f in files:
        shutil.copyfile(f, dst / f.name)
        fd = os.open(dst / f.name, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    return time.perf_counter() - t0


def child_env(work: Path) -> dict[str, str]:
    """Children keep a bytecode cache (as any pip-installed environment has) in the work dir."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update(PYTHONPATH=str(REPO / "src"), PYTHONPYCACHEPREFIX=str(work / "pycache"))
    return env


def run_measured(cmd: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    """(seconds, peak RSS bytes of the child, output)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{output}")
    return seconds, usage.ru_maxrss * 1024, output


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=3, help="2-4 (default 3: GDN, GDN, gated attention)")
    ap.add_argument("--shard-gb", type=float, default=4.0, help="HF shard size (hub: ~4 GB)")
    ap.add_argument("--experts", type=int, default=512, help="fewer only for a quick check of the script")
    ap.add_argument("--workdir", default=None, help="where the synthetic files go (default: a temp dir)")
    ap.add_argument("--date", default=time.strftime("%Y-%m-%d"))
    ap.add_argument("--machine", default=f"{os.cpu_count()}-core CPU")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/convert_speed"))
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="qnext-convert-bench-", dir=args.workdir))
    load_before = os.getloadavg()
    py = sys.executable
    try:
        cfg = synthetic_config(args.layers, args.experts)
        t0 = time.perf_counter()
        files = write_synthetic(work / "hf", cfg, int(args.shard_gb * GB))
        sizes = sorted((f.stat().st_size for f in files), reverse=True)
        total = sum(sizes)
        print(f"synthetic: {len(files)} shards, {total / GB:.2f} GB in {time.perf_counter() - t0:.0f} s", flush=True)

        env = child_env(work)
        subprocess.run([py, "-c", "import torch, torch.distributed.checkpoint, tqdm, qnext.convert"], env=env,
                       check=True, capture_output=True)  # warm the bytecode cache (not timed)

        copy_s = timed_copy(files, work / "copy")
        shutil.rmtree(work / "copy")
        print(f"copy: {copy_s:.1f} s ({total / GB / copy_s:.2f} GB/s)", flush=True)

        convert_cmd = [py, str(REPO / "tools/convert_hf_to_torch_dist.py"), "--hf", str(work / "hf"),
                       "--out", str(work / "mg"), "--no-progress"]
        conv_s, conv_rss, conv_log = run_measured(convert_cmd, env)
        conv_inner = float(re.search(r" in ([0-9.]+) s \(", conv_log).group(1))
        print(conv_log.strip(), flush=True)
        out_bytes = sum(p.stat().st_size for p in (work / "mg").rglob("*") if p.is_file())

        export_cmd = [py, str(REPO / "tools/convert_torch_dist_to_hf.py"), "--ckpt", str(work / "mg"),
                      "--out", str(work / "back"), "--no-progress"]
        exp_s, exp_rss, exp_log = run_measured(export_cmd, env)
        exp_inner = float(re.search(r" in ([0-9.]+) s \(", exp_log).group(1))
        print(exp_log.strip(), flush=True)
        same = all((work / "back" / f.name).stat().st_size == f.stat().st_size for f in files)
        shutil.rmtree(work / "back")

        copy2_s = timed_copy(files, work / "copy2")
        print(f"copy again: {copy2_s:.1f} s ({total / GB / copy2_s:.2f} GB/s)", flush=True)
        copy_best = min(copy_s, copy2_s)

        load_after = os.getloadavg()
        rss_limit = sizes[0] + sizes[1 if len(sizes) > 1 else 0] + 1 * 2**30
        result = {
            "date": args.date,
            "machine": args.machine,
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "command": shlex.join(["python", "benchmarks/convert_speed.py", *sys.argv[1:]]),
            "load_average_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
            "checkpoint": {"layers": args.layers, "layer_types": cfg["layer_types"], "hidden": 2048,
                           "experts": args.experts, "vocab": 151936, "dtype": "bfloat16", "shards": len(files),
                           "bytes": total, "largest_shards": sizes[:2]},
            "copy": {"seconds": round(copy_s, 2), "gb_per_s": round(total / GB / copy_s, 3),
                     "seconds_repeat": round(copy2_s, 2), "gb_per_s_repeat": round(total / GB / copy2_s, 3)},
            "convert": {"seconds": round(conv_s, 2), "gb_per_s": round(total / GB / conv_s, 3),
                        "seconds_in_process": conv_inner, "peak_rss_bytes": conv_rss, "output_bytes": out_bytes},
            "export": {"seconds": round(exp_s, 2), "gb_per_s": round(total / GB / exp_s, 3),
                       "seconds_in_process": exp_inner, "peak_rss_bytes": exp_rss, "same_file_sizes": same},
            "targets": {
                "convert_vs_copy": round(copy_best / conv_s, 3),
                "convert_vs_copy_min": 0.5,
                "peak_rss_limit_bytes": rss_limit,
                "speed_ok": copy_best / conv_s >= 0.5,
                "rss_ok": conv_rss < rss_limit,
            },
            "notes": "copy = shutil.copyfile + fsync per shard, run before and after the conversion; the ratio "
                     "uses the faster copy. convert/export seconds are whole subprocess wall times (interpreter "
                     "start, imports and checks included; bytecode cache warm, as after a pip install); "
                     "'in process' is the tool's own timer. Peak RSS is the subprocess's ru_maxrss. Source "
                     "files were in the page cache for every run (written just before). The 2 cores are "
                     "shared with other work, so timings vary between runs.",
        }
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown(result))
        print(markdown(result))
        return 0 if result["targets"]["speed_ok"] and result["targets"]["rss_ok"] else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


def markdown(r: dict) -> str:
    c = r["checkpoint"]
    t = r["targets"]
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    rows = [
        ("plain copy (cp + fsync)", r["copy"]["seconds"], r["copy"]["gb_per_s"], "-", "1.00"),
        ("plain copy, again", r["copy"]["seconds_repeat"], r["copy"]["gb_per_s_repeat"], "-", "-"),
        ("convert HF -> torch_dist (whole process)", r["convert"]["seconds"], r["convert"]["gb_per_s"],
         gib(r["convert"]["peak_rss_bytes"]), f"{t['convert_vs_copy']:.2f}"),
        ("convert, tool's own timer", r["convert"]["seconds_in_process"],
         r["checkpoint"]["bytes"] / GB / r["convert"]["seconds_in_process"], "-", "-"),
        ("export torch_dist -> HF (whole process)", r["export"]["seconds"], r["export"]["gb_per_s"],
         gib(r["export"]["peak_rss_bytes"]), "-"),
    ]
    lines = [
        "# Conversion speed (synthetic Qwen3-Next-80B-A3B widths)",
        "",
        f"Date {r['date']}, machine: {r['machine']} ({r['platform']}), torch {r['torch']}; "
        f"1-min load average before/after: {r['load_average_before_after'][0]} / {r['load_average_before_after'][1]}.",
        f"Command: `{r['command']}`",
        "",
        f"Checkpoint: {c['layers']} layers ({', '.join(c['layer_types'])}), hidden {c['hidden']}, {c['experts']} experts, "
        f"vocab {c['vocab']}, {c['dtype']}, {c['shards']} shards, {c['bytes'] / 1e9:.2f} GB "
        f"(largest shards {c['largest_shards'][0] / 1e9:.2f} + {c['largest_shards'][-1] / 1e9:.2f} GB).",
        "",
        "| step | seconds | GB/s | peak RSS | speed vs copy |",
        "|---|---:|---:|---:|---:|",
        *[f"| {a} | {b:.1f} | {c_:.2f} | {d} | {e} |" for a, b, c_, d, e in rows],
        "",
        f"Targets: convert >= 0.5x copy speed: **{'met' if t['speed_ok'] else 'NOT met'}** ({t['convert_vs_copy']:.2f}x); "
        f"peak RSS < two largest shards + 1 GiB = {gib(t['peak_rss_limit_bytes'])}: "
        f"**{'met' if t['rss_ok'] else 'NOT met'}** ({gib(r['convert']['peak_rss_bytes'])}).",
        "",
        r["notes"],
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
