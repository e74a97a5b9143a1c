"""``soteria env``: versions, devices and kernel backends, for bug reports."""

from __future__ import annotations

import importlib
import os
import platform
import sys

import torch

import soteria_kernels
from soteria_kernels._backend import INTERPRET

from ..heads.cache import cache_dir
from ..version import __version__


def _version(name: str) -> str:
    try:
        return getattr(importlib.import_module(name), "__version__", "installed")
    except Exception:  # noqa: BLE001 - report whatever stops the import
        return "not installed"


def report() -> dict[str, str]:
    """Everything a bug report needs, as ``{label: value}``."""

    info = {
        "soteria": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "safetensors": _version("safetensors"),
        "huggingface_hub": _version("huggingface_hub"),
        "accelerate": _version("accelerate"),
        "peft": _version("peft"),
        "cuda available": str(torch.cuda.is_available()),
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info[f"cuda:{i}"] = f"{p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}"
        info["cuda runtime"] = str(torch.version.cuda)
    cpu_backend = "triton (interpreter)" if soteria_kernels.HAS_TRITON and INTERPRET else "eager"
    info["kernel backend"] = f"cuda: {'triton' if soteria_kernels.HAS_TRITON else 'eager'}; cpu: {cpu_backend}"
    info["SOTERIA_BACKEND"] = os.environ.get("SOTERIA_BACKEND", "(unset: auto)")
    info["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET", "(unset)")
    info["cache dir"] = str(cache_dir())
    return info


def format_report(info: dict[str, str] | None = None) -> str:
    info = info or report()
    width = max(map(len, info))
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in info.items())


def main() -> int:
    print(format_report())
    return 0


def run(args) -> int:
    print(format_report())
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("env", help="versions, devices and kernel backends for bug reports")
    p.set_defaults(func=run)


if __name__ == "__main__":
    raise SystemExit(main())
