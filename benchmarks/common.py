"""Shared benchmark machinery: timing, environment record, bandwidth peaks, output files.

Timing (``measure``) runs the candidates *interleaved*, one call of each per round, so that on a shared
machine every candidate sees the same background load; it reports the median and the interquartile range
(IQR) of the per-call times. On CUDA each call is timed with a pair of CUDA events after warm-up; on the
CPU with ``time.perf_counter``.

Example::

    >>> t = measure({"sum": lambda: torch.ones(1000).sum()}, "cpu", warmup=1, repeats=5)
    >>> t["sum"].n, t["sum"].median_ms >= 0
    (5, True)
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import random
import re
import statistics
import subprocess
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Mapping, Sequence

import torch

# Peak DRAM/HBM bandwidth in GB/s (1e9 bytes/s) by device-name substring, most specific first (vendor datasheets).
GPU_PEAK_BANDWIDTH_GBPS: tuple[tuple[str, float], ...] = (
    ("GH200", 4000.0),
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),  # H100 SXM5 80GB HBM3
    ("H800", 3350.0),
    ("B200", 8000.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),  # 40GB
    ("L40S", 864.0),
    ("L40", 864.0),
    ("L4", 300.0),
    ("A10G", 600.0),
    ("A10", 600.0),
    ("RTX 4090", 1008.0),
    ("RTX 3090", 936.0),
    ("V100", 900.0),
    ("T4", 320.0),
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


# ---------------------------------------------------------------------- parsing helpers
def parse_sizes(text: str | Sequence[int]) -> list[int]:
    """``"4k,32k,128k"`` -> ``[4096, 32768, 131072]`` (``k`` = 1024; plain integers accepted)."""
    if not isinstance(text, str):
        return [int(x) for x in text]
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        m = re.fullmatch(r"(\d+(?:\.\d+)?)([km]?)", part)
        if not m:
            raise ValueError(f"cannot parse size {part!r}: use integers or 4k-style suffixes (k = 1024)")
        mult = {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2)]
        out.append(int(float(m.group(1)) * mult))
    return out


def parse_list(text: str | Sequence[str]) -> list[str]:
    if not isinstance(text, str):
        return list(text)
    return [p.strip() for p in text.split(",") if p.strip()]


def size_label(n: int) -> str:
    """``32768`` -> ``"32k"``; sizes that are not whole multiples of 1024 stay plain."""
    return f"{n // 1024}k" if n % 1024 == 0 and n >= 1024 else str(n)


# ---------------------------------------------------------------------- timing
@dataclass
class Timing:
    """Summary of per-call times in milliseconds."""

    median_ms: float
    p25_ms: float
    p75_ms: float
    min_ms: float
    max_ms: float
    n: int

    @property
    def iqr_ms(self) -> float:
        return self.p75_ms - self.p25_ms

    def to_dict(self) -> dict:
        d = asdict(self)
        d["iqr_ms"] = self.iqr_ms
        return d

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float]) -> "Timing":
        if not samples_ms:
            raise ValueError("no samples")
        s = sorted(samples_ms)
        return cls(statistics.median(s), _quantile(s, 0.25), _quantile(s, 0.75), s[0], s[-1], len(s))


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile of an already sorted list."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def synchronize(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fns: Mapping[str, Callable[[], object]], device: torch.device | str = "cpu", *, warmup: int = 2,
            repeats: int = 20, min_repeats: int = 3, max_seconds: float | None = None,
            shuffle: bool = True) -> dict[str, Timing]:
    """Time every callable of ``fns``, interleaved: each round calls each of them once.

    With ``shuffle`` every timed round runs them in a fresh (seeded) random order, so that what one
    candidate leaves behind in the caches and the allocator does not always land on the same neighbour.

    Args:
        fns: ``{name: fn}``; each ``fn()`` runs one operation (its result is discarded).
        device: where they run (CUDA: timed with CUDA events, synchronised once per round).
        warmup: untimed rounds first.
        repeats: timed rounds at most.
        min_repeats: timed rounds at least, even past ``max_seconds``.
        max_seconds: stop after the round in which the wall time of the timed rounds passes this.
    Returns:
        ``{name: Timing}``.
    """
    device = torch.device(device)
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in names}
    rng = random.Random(0)
    t_start = time.perf_counter()
    for r in range(max(repeats, 1)):
        if shuffle:
            rng.shuffle(names)
        if device.type == "cuda":
            events = []
            for name in names:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fns[name]()
                end.record()
                events.append((name, start, end))
            torch.cuda.synchronize(device)
            for name, start, end in events:
                samples[name].append(start.elapsed_time(end))
        else:
            for name in names:
                t0 = time.perf_counter()
                fns[name]()
                samples[name].append((time.perf_counter() - t0) * 1e3)
        if max_seconds is not None and r + 1 >= min_repeats and time.perf_counter() - t_start > max_seconds:
            break
    return {name: Timing.from_samples(s) for name, s in samples.items()}


def step_counts(fn: Callable[[], object], device: torch.device | str = "cpu", warmup: int = 1) -> dict:
    """Aten ops, host syncs and Triton launches of one call of ``fn``, after ``warmup`` calls
    (``twilight.diagnostics.count_ops``).

    On CUDA only syncs on device tensors and CPU<->device copies count; on the CPU every host read of a tensor's
    values counts (it is what would wait for the device on a GPU). Returns ``count_ops``'s ``as_dict()`` with the
    sync sites aggregated: ``[{"op", "where", "n"}]``, most frequent first.

    Example::

        >>> x = torch.arange(4.0)
        >>> d = step_counts(lambda: x[x > 1].sum().item(), "cpu")
        >>> d["ops"], d["syncs"], [(s["op"], s["n"]) for s in d["sync_sites"]]
        (4, 2, [('aten.index', 1), ('aten._local_scalar_dense', 1)])
    """
    from twilight.diagnostics import count_ops

    device = torch.device(device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    with count_ops(cpu_syncs=device.type != "cuda") as c:
        fn()
    synchronize(device)
    d = c.as_dict()
    sites = Counter((s.op, s.where) for s in c.sync_sites)
    d["sync_sites"] = [{"op": op, "where": where, "n": n} for (op, where), n in sites.most_common()]
    return d


# ---------------------------------------------------------------------- environment
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _module_version(name: str) -> str | None:
    try:
        module = __import__(name)
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    return getattr(module, "__version__", "unknown")


def _git_commit() -> dict:
    here = os.path.dirname(os.path.abspath(__file__))
    out = {}
    for key, cmd in (("commit", ["git", "rev-parse", "HEAD"]), ("dirty", ["git", "status", "--porcelain", "-uno"])):
        try:
            res = subprocess.run(cmd, cwd=here, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return {"commit": None}
        if res.returncode != 0:
            return {"commit": None}
        out[key] = res.stdout.strip() if key == "commit" else bool(res.stdout.strip())
    return out


def _nvidia_driver() -> str | None:
    try:
        res = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip().splitlines()[0] if res.returncode == 0 and res.stdout.strip() else None


def environment(device: torch.device | str = "cpu") -> dict:
    """Everything needed to tell two result files apart: device, driver, versions, date, git commit."""
    device = torch.device(device)
    env = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device_type": device.type,
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _module_version("transformers"),
        "triton": _module_version("triton"),
        "flashinfer": _module_version("flashinfer"),
        "twilight": _module_version("twilight"),
        "git": _git_commit(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({
            "device_name": torch.cuda.get_device_name(device),
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "gpu_sm_count": props.multi_processor_count,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "driver": _nvidia_driver(),
        })
    else:
        env["device_name"] = f"{env['cpu_model']} ({env['cpu_cores']} cores)"
    return env


def device_slug(env: Mapping) -> str:
    """Short filesystem-safe device name: ``cpu-amd-epyc-2c``, ``nvidia-h100-80gb-hbm3``."""
    if env.get("device_type") == "cuda":
        base = env.get("device_name", "cuda")
    else:
        base = f"cpu-{env.get('cpu_model', 'cpu')}-{env.get('cpu_cores', 0)}c"
    slug = re.sub(r"[^a-z0-9]+", "-", base.lower()).strip("-")
    return slug[:60] or "device"


def default_out_dir(env: Mapping, root: str = os.path.join("benchmarks", "results")) -> str:
    """``benchmarks/results/<device>-<YYYY-MM-DD>`` (relative to the current directory)."""
    return os.path.join(root, f"{device_slug(env)}-{env['date'][:10]}")


def available_memory_bytes(device: torch.device | str) -> int:
    """Free memory on ``device`` (CPU: ``MemAvailable``)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return 8 * 2**30


# ---------------------------------------------------------------------- bandwidth
def measure_bandwidth(device: torch.device | str = "cpu", nbytes: int = 512 * 2**20, repeats: int = 10) -> dict:
    """Achievable memory bandwidth on ``device``, measured now with a large fp32 tensor.

    ``read_gbps``: ``x.sum()`` (reads ``nbytes``); ``copy_gbps``: ``y.copy_(x)`` (reads and writes ``nbytes``,
    counted as ``2 * nbytes``). Medians over ``repeats``; GB = 1e9 bytes.
    """
    device = torch.device(device)
    n = nbytes // 4
    x = torch.rand(n, device=device)
    y = torch.empty_like(x)
    t = measure({"read": lambda: x.sum(), "copy": lambda: y.copy_(x)}, device, warmup=2, repeats=repeats)
    read = nbytes / (t["read"].median_ms * 1e-3) / 1e9
    copy = 2 * nbytes / (t["copy"].median_ms * 1e-3) / 1e9
    return {"read_gbps": read, "copy_gbps": copy, "bytes": nbytes,
            "read_timing": t["read"].to_dict(), "copy_timing": t["copy"].to_dict()}


def peak_bandwidth(device: torch.device | str = "cpu", env: Mapping | None = None, measure_now: bool = True,
                   nbytes: int = 512 * 2**20) -> dict:
    """The roofline's bandwidth for ``device``.

    CPU: measured now (``measure_bandwidth``; the larger of the read and copy rates is the peak).
    GPU: the datasheet figure for the device name (``GPU_PEAK_BANDWIDTH_GBPS``), with the measured copy/read
    rates alongside; a GPU not in the table falls back to the measured rate.
    """
    device = torch.device(device)
    measured = measure_bandwidth(device, nbytes) if measure_now else None
    if device.type == "cuda":
        name = (env or {}).get("device_name") or torch.cuda.get_device_name(device)
        for key, gbps in GPU_PEAK_BANDWIDTH_GBPS:
            if key.lower() in name.lower():
                return {"peak_gbps": gbps, "source": f"datasheet ({key})", "measured": measured}
    if measured is None:
        raise ValueError("no datasheet peak for this device: measure_now must be True")
    peak = max(measured["read_gbps"], measured["copy_gbps"])
    return {"peak_gbps": peak, "source": "measured now (max of tensor sum and copy)", "measured": measured}


# ---------------------------------------------------------------------- output
def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, default=_json_default)
        f.write("\n")


def _json_default(obj):
    if isinstance(obj, torch.dtype):
        return DTYPE_NAMES.get(obj, str(obj))
    if isinstance(obj, torch.device):
        return str(obj)
    if isinstance(obj, Timing):
        return obj.to_dict()
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence]) -> str:
    """A GitHub Markdown table (cells converted with ``str``)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def fmt_ms(t: Mapping | None, spread: bool = True) -> str:
    """``"12.3 ±0.4"``: median and half the IQR, in ms (``"—"`` when missing)."""
    if not t:
        return "—"
    med = t["median_ms"]
    digits = 3 if med < 1 else 2 if med < 10 else 1
    if not spread:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} ±{t['iqr_ms'] / 2:.{digits}f}"


def environment_markdown(env: Mapping, peak: Mapping | None = None) -> str:
    parts = [f"device: **{env.get('device_name')}**", f"date {env.get('date')}", f"torch {env.get('torch')}",
             f"transformers {env.get('transformers')}", f"triton {env.get('triton')}"]
    if env.get("flashinfer"):
        parts.append(f"flashinfer {env['flashinfer']}")
    if env.get("driver"):
        parts.append(f"driver {env['driver']}, CUDA {env.get('cuda')}")
    git = env.get("git") or {}
    if git.get("commit"):
        parts.append(f"commit {git['commit'][:10]}{' (dirty)' if git.get('dirty') else ''}")
    if env.get("device_type") != "cuda":
        parts.append(f"{env.get('torch_threads')} torch threads")
        if env.get("load_average"):
            parts.append(f"load average at start {env['load_average'][0]:.2f}")
    if peak:
        parts.append(f"bandwidth peak {peak['peak_gbps']:.1f} GB/s ({peak['source']})")
    return "; ".join(parts)


def pyplot():
    """matplotlib's ``pyplot`` on the non-interactive Agg backend, or ``None`` when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt
