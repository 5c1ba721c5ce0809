"""What a record needs to say about where it was measured: code version, libraries, device, threads."""

from __future__ import annotations

import platform
import subprocess
from functools import cache
from pathlib import Path

import torch
import transformers

import eebench


@cache
def git_commit() -> str:
    """HEAD of the eebench checkout ("+dirty" when it has uncommitted changes), or "unknown" (installed wheel)."""
    source = Path(eebench.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        # Only code counts: results/ and README changes do not make the measured code "dirty". An untracked
        # file under the code folders does (a new module can change what runs); ignored ones (caches) do not.
        code = ["benchmarks", "methods", "plots", "pyproject.toml"]
        dirty = subprocess.run(["git", "-C", str(source.parent), "status", "--porcelain", "--untracked-files=all",
                                "--", *code], capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device | str, dtype: torch.dtype = torch.float32) -> dict[str, str | int]:
    return {
        "eebench_version": eebench.__version__,
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.device(device).type,
        "device_name": device_name(device),
        "torch_threads": torch.get_num_threads(),
        "dtype": str(dtype).replace("torch.", ""),
        "platform": platform.platform(),
    }
