"""Bench output: the environment line, and the results as a markdown table (llama-bench style), JSON or
CSV. Pure functions of the result dict that ``bench.run_bench`` returns."""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

ROW_FIELDS = ["test", "kind", "n_prompt", "n_gen", "depth", "unit", "mean", "stddev", "samples",
              "bytes_per_token", "roofline_tps", "roofline_pct",
              "hf_mean", "hf_stddev", "hf_samples", "hf_roofline_pct", "speed_ratio"]
MODEL_FIELDS = ["name", "synthetic", "format", "device", "dtype", "kv_dtype", "params", "size_bytes", "load_s"]
MEMORY_FIELDS = ["peak_device_bytes", "weights_device_bytes", "peak_rss_bytes", "state_bytes",
                 "kv_bytes_per_token", "hf_peak_device_bytes", "hf_load_s"]
ROOFLINE_FIELDS = ["bandwidth_bytes_per_s", "bandwidth_buffer_bytes"]
ENV_FIELDS = ["device_name", "driver", "cuda", "torch", "triton", "transformers", "bitsandbytes", "commit",
              "date", "compare"]


# ---- environment ---------------------------------------------------------------------------------
def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def _run(cmd: list[str], cwd: Path | None = None) -> str | None:
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def git_commit() -> str | None:
    """Short commit of the olmo-local checkout (+dirty with uncommitted tracked changes), else
    $OLMO_LOCAL_COMMIT (for copies of the tree without .git), else None."""
    root = Path(__file__).resolve().parent.parent
    sha = _run(["git", "rev-parse", "--short=10", "HEAD"], root)
    if sha:
        dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"], root)
        return sha + ("+dirty" if dirty else "")
    return os.environ.get("OLMO_LOCAL_COMMIT") or None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device, compare: str | None = None) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = dict.fromkeys(ENV_FIELDS)
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        drv = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        env["driver"] = drv.splitlines()[0].strip() if drv else None
        env["cuda"] = torch.version.cuda
    else:
        n = torch.get_num_threads()
        env["device_name"] = f"{_cpu_name()} ({n} thread{'' if n == 1 else 's'})"
    env["torch"] = torch.__version__
    env["triton"] = _version("triton")
    env["transformers"] = _version("transformers") if compare else None
    env["bitsandbytes"] = _version("bitsandbytes") if compare == "hf-nf4" else None
    env["commit"] = git_commit()
    env["date"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    env["compare"] = compare
    return env


def env_line(env: dict[str, Any]) -> str:
    parts = [f"olmo-local {_version('olmo-local') or '?'}", f"commit {env.get('commit') or 'unknown'}",
             str(env.get("device_name"))]
    for key, label in (("driver", "driver"), ("cuda", "CUDA"), ("torch", "torch"), ("triton", "triton"),
                       ("transformers", "transformers"), ("bitsandbytes", "bitsandbytes")):
        if env.get(key):
            parts.append(f"{label} {env[key]}")
    parts.append(str(env.get("date")))
    return " · ".join(parts)


# ---- number formatting ---------------------------------------------------------------------------
def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def fmt_params(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return str(n)


def _num(x: float | None, digits: int = 2) -> str:
    return "" if x is None else f"{x:.{digits}f}"


# ---- renderers -----------------------------------------------------------------------------------
def render_markdown(res: dict[str, Any]) -> str:
    m, mem, roof = res["model"], res["memory"], res["roofline"]
    cmp = res["env"].get("compare")
    head = ["model", "size", "params", "format", "device", "test", "t/s", "roofline t/s", "% roofline"]
    if cmp:
        head += [f"{cmp} t/s", f"ours/{cmp}"]
    lines = [env_line(res["env"]), "", "| " + " | ".join(head) + " |",
             "| " + " | ".join("---:" if h in ("size", "params") or "t/s" in h or "%" in h or "/" in h
                                else "---" for h in head) + " |"]
    for r in res["rows"]:
        unit = " ms" if r["unit"] == "ms" else ""
        cells = [m["name"], fmt_bytes(m["size_bytes"]), fmt_params(m["params"]), m["format"], m["device"],
                 r["test"], f"{r['mean']:.2f} ± {r['stddev']:.2f}{unit}", _num(r["roofline_tps"]),
                 _num(r["roofline_pct"], 1)]
        if cmp:
            hf = "" if r["hf_mean"] is None else f"{r['hf_mean']:.2f} ± {r['hf_stddev']:.2f}{unit}"
            cells += [hf, "" if r["speed_ratio"] is None else f"{r['speed_ratio']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"load {m['load_s']:.2f} s · weights {fmt_bytes(m['size_bytes'])} · peak device memory "
                 f"{fmt_bytes(mem['peak_device_bytes'])} · peak host RSS {fmt_bytes(mem['peak_rss_bytes'])} · "
                 f"state {fmt_bytes(mem['state_bytes'])} + {fmt_bytes(mem['kv_bytes_per_token'])}/token KV "
                 f"({m['kv_dtype']})")
    bw = roof["bandwidth_bytes_per_s"]
    lines.append(f"roofline: copy bandwidth {bw / 1e9:.1f} GB/s (read+write, {fmt_bytes(roof['bandwidth_buffer_bytes'])}"
                 f" buffer, best of 20) / bytes per token {roof['bytes_per_token_d0'] / 1e6:.2f} MB at depth 0 "
                 f"+ {fmt_bytes(mem['kv_bytes_per_token'])} per cached position (tg rows use the run's mean depth)")
    if cmp:
        lines.append(f"{cmp}: load {mem['hf_load_s']:.2f} s · peak device memory "
                     f"{fmt_bytes(mem['hf_peak_device_bytes'])}; ours/{cmp} is the speed ratio "
                     "(for ttft: their ms / our ms); >1 means olmo-local is faster")
    return "\n".join(lines) + "\n"


def _flat_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for r in res["rows"]:
        row = {f"model_{k}": res["model"][k] for k in MODEL_FIELDS}
        row.update({k: r[k] for k in ROW_FIELDS})
        row["samples"] = ";".join(f"{x:.4f}" for x in r["samples"])
        row["hf_samples"] = ";".join(f"{x:.4f}" for x in r["hf_samples"] or [])
        row.update({k: res["memory"][k] for k in MEMORY_FIELDS})
        row.update({k: res["roofline"][k] for k in ROOFLINE_FIELDS})
        row.update({f"env_{k}": res["env"][k] for k in ENV_FIELDS})
        rows.append(row)
    return rows


def csv_columns() -> list[str]:
    return ([f"model_{k}" for k in MODEL_FIELDS] + ROW_FIELDS + MEMORY_FIELDS + ROOFLINE_FIELDS
            + [f"env_{k}" for k in ENV_FIELDS])


def render_csv(res: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=csv_columns(), lineterminator="\n")
    w.writeheader()
    for row in _flat_rows(res):
        w.writerow(row)
    return buf.getvalue()


def render_json(res: dict[str, Any]) -> str:
    return json.dumps(res, indent=2) + "\n"


RENDERERS = {"md": render_markdown, "json": render_json, "csv": render_csv}
