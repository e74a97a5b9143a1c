"""GGUF in, plain transformers out: load a GGUF file as a dequantized, serializable causal LM.

Transformers reads a GGUF file with ``from_pretrained(folder, gguf_file=name)`` (needs the
``gguf`` package) and dequantizes every tensor into ordinary ``nn.Linear`` / ``nn.Embedding``
weights, but leaves a ``quantization_config`` (``quant_method="gguf"``) and a quantizer on the
model, so ``save_pretrained`` refuses it ("quantized with gguf and is not serializable"). The
weights are plain floats by then: :func:`dequantized` drops both records, and the model saves
as an ordinary safetensors checkpoint that plain transformers loads.

A folder whose ``config.json`` still carries the gguf ``quantization_config`` (saved from such
a model by other tools) holds plain weights too; :func:`strip_gguf_config` is what the loaders
apply to its config before loading, so it never reaches ``save_pretrained`` with the record.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["check_gguf_file", "dequantized", "is_gguf_config", "strip_gguf_config"]


def _quant_method(config: Any) -> str | None:
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return str(getattr(method, "value", method)).lower() if method is not None else None


def is_gguf_config(config: Any) -> bool:
    """True when ``config`` carries transformers' GGUF ``quantization_config``."""
    return _quant_method(config) == "gguf"


def strip_gguf_config(config: Any) -> Any:
    """``config`` without a gguf ``quantization_config`` (in place; returned for chaining).
    Any other quantization method is left alone."""
    if is_gguf_config(config):
        delattr(config, "quantization_config")
    return config


def dequantized(model):
    """``model`` (loaded with ``gguf_file=``) made an ordinary model: its gguf quantizer and
    ``config.quantization_config`` are dropped, so ``save_pretrained`` writes plain safetensors.
    Returns the same model."""
    if getattr(model, "hf_quantizer", None) is not None and is_gguf_config(model.config):
        model.hf_quantizer = None
    strip_gguf_config(model.config)
    return model


def check_gguf_file(folder: str | os.PathLike, gguf_file: str) -> Path:
    """The path of ``gguf_file`` inside ``folder`` (or ``gguf_file`` itself when it is a path
    to an existing file); FileNotFoundError naming what is missing, ValueError when the file
    does not start with the GGUF magic. Checked before any model is built."""
    path = Path(gguf_file)
    if not path.is_file():
        path = Path(folder) / gguf_file
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file {gguf_file!r} in {str(folder)!r}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError:
        raise ValueError("reading GGUF files needs the gguf package: pip install gguf") from None
    return path
