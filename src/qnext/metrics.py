"""Training metrics: one record per log step, printed and written the same way by every backend.

Each record carries loss, grad norm, learning rate, tokens/s, peak memory and step time (plus
whatever the caller adds, e.g. eval loss). Sinks: ``<output_dir>/metrics.jsonl`` (always, appended,
so a resumed run continues the same file), TensorBoard (``logging.tensorboard``), wandb (only when
installed; offline unless ``WANDB_API_KEY`` is set; never required). ``close()`` draws the loss
curve (``loss_curve.png``) from the JSONL file. Only rank 0 writes; other ranks get a no-op logger.
"""
from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import torch

from .fsutil import atomic_write_bytes, atomic_write_text

METRICS_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"

# printed in this order, with these formats; other keys follow as they come
_FORMATS = {
    "loss": ("loss", "{:.4f}"),
    "grad_norm": ("gnorm", "{:.3f}"),
    "lr": ("lr", "{:.2e}"),
    "tokens_per_s": ("tok/s", "{:.0f}"),
    "tflops_per_device": ("TFLOP/s/dev", "{:.2f}"),
    "mfu": ("MFU", "{:.1%}"),
    "peak_mem_gib": ("mem", "{:.2f}GiB"),
    "peak_reserved_gib": ("reserved", "{:.2f}GiB"),
    "step_time_s": ("step", "{:.2f}s"),
    "eval_loss": ("eval_loss", "{:.4f}"),
    "eval_ppl": ("eval_ppl", "{:.2f}"),
}


def peak_memory_gib(device: torch.device | str | None = None) -> float:
    """CUDA: max allocated since start (or last reset); CPU: the process's peak RSS."""
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(dev) / 2**30
    # ru_maxrss is KiB on Linux, bytes on macOS
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def reset_step_peak(device: torch.device | str | None = None) -> None:
    """Start a new peak-memory window (CUDA): each step's ``peak_mem_gib`` is then that step's own peak,
    so steady-state steps are not masked by the first one (Triton autotuning, model build)."""
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(dev)


def peak_reserved_gib(device: torch.device | str | None = None) -> float | None:
    """CUDA: the caching allocator's max reserved bytes (what the GPU holds for tensors, fragmentation
    included); ``None`` off CUDA."""
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_reserved(dev) / 2**30
    return None


PROFILE_ENV = "QNEXT_PROFILE_STEP"
TRACE_ENV = "QNEXT_PROFILE_TRACE"  # =1: the profiled step's timeline too (profile_step<N>_rank<R>.trace.json.gz)


def median_seconds(call, iters: int, cuda: bool) -> float:
    """Median wall seconds of ``call()`` over ``iters`` calls after one untimed call (``cuda``: each timed call
    between device synchronizations, so that its kernels are inside the time)."""
    import statistics

    call()
    times = []
    for _ in range(iters):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        call()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def profile_step_wanted(step: int) -> bool:
    """``QNEXT_PROFILE_STEP=N`` asks for a profile of step N (1-based); checked before each step."""
    raw = os.environ.get(PROFILE_ENV, "").strip()
    if not raw:
        return False
    try:
        return int(raw) == step
    except ValueError:
        from .errors import UserError

        raise UserError(f"{PROFILE_ENV}={raw!r} is not a step number", hint=f"e.g. {PROFILE_ENV}=4 (a step after the warm-up)") from None


LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")


def host_device_summary(avg) -> str:
    """One line: the profiled step's host time (self CPU, all operators), device time (self CUDA) and kernel
    launches, so that a host-bound step (host > device) shows at a glance."""
    from torch.autograd import DeviceType

    host = sum(e.self_cpu_time_total for e in avg) / 1e3
    # the kernels' own rows, as torch's table totals them: an operator's row repeats its kernels' device time
    kernels = [e for e in avg
               if getattr(e, "device_type", None) == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
    device = sum(e.self_device_time_total for e in kernels) / 1e3
    launches = sum(e.count for e in avg if e.key in LAUNCHES)
    return (f"host (self CPU) total {host:.1f} ms, device (self CUDA) total {device:.1f} ms, "
            f"kernel launches {launches} (profiler overhead included)")


class StepProfile:
    """``with StepProfile(step, out_dir, rank):`` around one training step: when ``QNEXT_PROFILE_STEP``
    names this step, the step runs under ``torch.profiler`` (CPU + CUDA activity, memory) and
    ``<out_dir>/profile_step<N>_rank<R>.txt`` gets the operators by total device time and by memory they
    allocated; otherwise it does nothing. The profiled step is slower: leave it out of timings."""

    def __init__(self, step: int, out_dir: str | os.PathLike, rank: int = 0):
        self.step, self.out_dir, self.rank = step, Path(out_dir), rank
        self.active = profile_step_wanted(step)
        self.path: Path | None = None
        self._prof = None

    def __enter__(self) -> "StepProfile":
        if self.active:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self._prof = profile(activities=acts, profile_memory=True)
            self._prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._prof is None:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._prof.__exit__(*exc)
        if exc[0] is not None:
            return
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        avg = self._prof.key_averages()
        text = (f"# profile of step {self.step}, rank {self.rank} ({PROFILE_ENV}={self.step})\n\n"
                f"{host_device_summary(avg)}\n\n"
                f"## by total {dev} time\n{avg.table(sort_by=f'{dev}_time_total', row_limit=40)}\n\n"
                f"## by self {dev} time (time in the operator's own kernels, not its children's)\n"
                f"{avg.table(sort_by=f'self_{dev}_time_total', row_limit=40)}\n\n"
                f"## by {dev} memory allocated in the operator itself\n"
                f"{avg.table(sort_by=f'self_{dev}_memory_usage', row_limit=25)}\n")
        if dev == "cuda":  # a host-bound step: where the host's time goes
            text += f"\n## by self host (CPU) time\n{avg.table(sort_by='self_cpu_time_total', row_limit=40)}\n"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / f"profile_step{self.step}_rank{self.rank}.txt"
        atomic_write_text(self.path, text)
        if os.environ.get(TRACE_ENV, "").strip() not in ("", "0"):
            self._write_trace()

    def _write_trace(self) -> None:
        """The step's timeline as a gzipped Chrome trace (open in Perfetto), next to the table."""
        import gzip
        import tempfile

        final = self.out_dir / f"profile_step{self.step}_rank{self.rank}.trace.json.gz"
        with tempfile.TemporaryDirectory(dir=self.out_dir) as tmp:
            raw = Path(tmp) / "trace.json"
            self._prof.export_chrome_trace(str(raw))
            part = Path(tmp) / "trace.json.gz"
            with raw.open("rb") as src, gzip.open(part, "wb", compresslevel=6) as dst:
                dst.writelines(src)
            os.replace(part, final)


def format_record(rec: dict[str, Any], total_steps: int | None = None) -> str:
    step = rec.get("step")
    head = f"step {step}" + (f"/{total_steps}" if total_steps else "")
    parts = [head]
    for key, (label, fmt) in _FORMATS.items():
        if key in rec and rec[key] is not None:
            parts.append(f"{label} {fmt.format(rec[key])}")
    for key, val in rec.items():
        if key in _FORMATS or key in ("step", "time"):
            continue
        parts.append(f"{key} {val:.4g}" if isinstance(val, float) else f"{key} {val}")
    return " | ".join(parts)


class MetricsLogger:
    """Print + JSONL + TensorBoard + wandb for one run. Use as a context manager or call close()."""

    def __init__(
        self,
        output_dir: str | os.PathLike,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        wandb: str = "auto",
        wandb_project: str = "qnext",
        wandb_mode: str = "auto",
        run_name: str | None = None,
        config: dict[str, Any] | None = None,
        total_steps: int | None = None,
        progress_bar: bool = True,
        start_step: int = 0,
        tensorboard_writer: Any = None,
        wandb_run: Any = None,
    ):
        self.enabled = enabled
        self.output_dir = Path(output_dir)
        self.total_steps = total_steps
        self._tb = None
        self._wandb = None
        self._bar = None
        if not enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.output_dir / METRICS_FILE
        if start_step == 0 and self.path.exists():
            self.path.unlink()  # a fresh run (overwrite=true) starts a fresh file
        elif start_step > 0 and self.path.exists():
            self._truncate_after(start_step)  # a resumed run drops records past its checkpoint
        self._file = open(self.path, "a", buffering=1)
        # A backend that already opened the sinks (megatron.training's writers) hands them over.
        if tensorboard_writer is not None:
            self._tb = tensorboard_writer
        elif tensorboard:
            self._tb = _open_tensorboard(self.output_dir / "tensorboard")
        if wandb_run is not None:
            self._wandb = wandb_run
        else:
            self._wandb = _open_wandb(wandb, wandb_project, wandb_mode, run_name, config, self.output_dir)
        if progress_bar and total_steps and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, leave=False)

    def _truncate_after(self, step: int) -> None:
        keep = [line for line in self.path.read_text().splitlines() if line.strip() and _step_of(line) <= step]
        atomic_write_bytes(self.path, ("\n".join(keep) + ("\n" if keep else "")).encode())

    def log(self, step: int, record: dict[str, Any], *, echo: bool = True) -> None:
        if not self.enabled:
            return
        rec = {"step": int(step), "time": round(time.time(), 3)}
        rec.update({k: _plain(v) for k, v in record.items()})
        self._file.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            for key, val in rec.items():
                if key not in ("step", "time") and isinstance(val, (int, float)) and math.isfinite(val):
                    self._tb.add_scalar(f"train/{key}" if not key.startswith("eval") else f"eval/{key}", val, step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in rec.items() if k != "time"}, step=step)
        if echo:
            self.print(format_record(rec, self.total_steps))

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self, plot: bool = True) -> Path | None:
        if not self.enabled:
            return None
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        return plot_loss_curve(self.path, self.output_dir / LOSS_CURVE_FILE) if plot else None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close(plot=exc[0] is None)


SUMMARY_KEYS = ("steps", "final_loss", "eval_loss", "eval_ppl", "wall_s")


def summary_line(summary: dict[str, Any]) -> str:
    """The one-line ``summary: ...`` both training entries print at the end of a run."""
    return "summary: " + ", ".join(f"{k}={summary[k]:.4g}" if isinstance(summary.get(k), float) else f"{k}={summary.get(k)}"
                                   for k in SUMMARY_KEYS if k in summary)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out


def plot_loss_curve(metrics_path: str | os.PathLike, png_path: str | os.PathLike) -> Path | None:
    """Training loss per step (and eval loss where recorded) from a metrics.jsonl, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(metrics_path) if Path(metrics_path).exists() else []
    train = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in recs if "eval_loss" in r]
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.5)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(Path(metrics_path).parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(png_path, buf.getvalue())
    return Path(png_path)


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, TypeError, ValueError):
        return 0


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, float):
        return v
    return v


def _open_tensorboard(logdir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception as err:  # tensorboard is a dependency; a broken install should not stop training
        print(f"warning: TensorBoard disabled ({err})", file=sys.stderr)
        return None
    return SummaryWriter(log_dir=str(logdir))


def _open_wandb(enabled: str | bool, project: str, mode: str, name: str | None, config: dict | None, out: Path):
    """wandb when installed (``auto``) or asked for (``true``); offline without WANDB_API_KEY."""
    flag = str(enabled).lower()
    if flag in ("false", "0", "no", "off") or os.environ.get("WANDB_MODE") == "disabled":
        return None
    try:
        import wandb
    except ImportError:
        if flag in ("true", "1", "yes", "on"):
            print("warning: logging.wandb.enabled=true but wandb is not installed (pip install -e .[wandb])",
                  file=sys.stderr)
        return None
    if mode == "auto":
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return wandb.init(project=project, name=name, config=config, mode=mode, dir=str(out), reinit=True)


def summarize(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """First/last loss, mean tokens/s (steady state: skips the first record), peak memory."""
    recs = [r for r in records if "loss" in r]
    if not recs:
        return {}
    tps = [r["tokens_per_s"] for r in recs[1:] if "tokens_per_s" in r] or [recs[0].get("tokens_per_s", 0.0)]
    return {
        "first_loss": recs[0]["loss"],
        "last_loss": recs[-1]["loss"],
        "mean_tokens_per_s": sum(tps) / len(tps),
        "peak_mem_gib": max(r.get("peak_mem_gib", 0.0) for r in recs),
        "steps": recs[-1]["step"],
    }
