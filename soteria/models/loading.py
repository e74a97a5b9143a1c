"""Load the model a user names: a folder, a Hub id, a GGUF file, ``tiny:<type>`` or ``pretrained:<name>``.

One place for the commands (``soteria heads``, ``steer``, ``eval``, ``demo``) and for scripts:

- a folder or Hub id: ``AutoModelForCausalLM.from_pretrained``; a folder whose ``config.json``
  still carries transformers' gguf ``quantization_config`` (its weights are plain floats) is
  loaded without it, so the result saves as ordinary safetensors;
- ``gguf_file=NAME`` with a folder: that GGUF file, dequantized (:mod:`soteria.models.gguf`);
- ``tiny:<model_type>``: a tiny random model built locally (:mod:`soteria.models.tiny`);
- ``pretrained:<name>``: a real model fetched once through pip (:mod:`soteria.models.pretrained`).

Every mistake (missing path, bad dtype or device, no such GGUF file, a quantized model that
cannot be edited) is a FileNotFoundError or ValueError naming it, raised before weights are read.
"""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError

from ..arch import num_layers_heads
from ..io.hub import looks_like_repo_id
from .gguf import check_gguf_file, dequantized, is_gguf_config, strip_gguf_config
from .pretrained import MODELS, fetch
from .tiny import tiny_model, tiny_tokenizer

__all__ = [
    "DEVICE_MAPS",
    "check_device",
    "check_source",
    "load_causal_lm",
    "load_model",
    "load_tokenizer",
    "meta_model",
    "model_shape",
]

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def _dtype(name: str):
    import torch

    table = {"auto": "auto", "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}  # fmt: skip
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(table)}")
    return table[name]


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def check_source(spec: str, what: str = "model") -> str:
    """``spec`` when it can name a model: ``tiny:<model_type>``, ``pretrained:<name>``, an existing
    path or a Hub id (``name`` or ``owner/name``); otherwise FileNotFoundError / ValueError naming it."""
    if spec.startswith("pretrained:"):
        name = spec.split(":", 1)[1]
        if name not in MODELS:
            raise ValueError(f"{what} {spec!r}: no such pretrained model; choose one of {', '.join(MODELS)}")
        return spec
    if spec.startswith("tiny:") or Path(spec).exists() or looks_like_repo_id(spec):
        return spec
    raise FileNotFoundError(
        f"{what} not found: {spec!r} is not a local folder, a Hub id (owner/name), tiny:<model_type> "
        "or pretrained:<name>"
    )


def check_device(device: str | None) -> str | None:
    """``device`` when it is None, an accelerate device map name or a torch device this machine has;
    otherwise ValueError."""
    if device is None or device in DEVICE_MAPS:
        return device
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device (cpu, cuda, cuda:1, ...) or device map (auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here (torch {torch.__version__})")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _resolve(spec: str, gguf_file: str | None) -> str:
    """The folder or Hub id behind ``spec`` (``pretrained:`` fetched); checks a GGUF file up front."""
    if spec.startswith("pretrained:"):
        if gguf_file is not None:
            raise ValueError(f"{spec} is already converted; drop --gguf-file")

        return str(fetch(spec.split(":", 1)[1]))
    if gguf_file is not None:
        if spec.startswith("tiny:"):
            raise ValueError("--gguf-file needs a folder that holds the GGUF file, not a tiny: model")

        if Path(spec).is_dir() or Path(gguf_file).is_file():
            check_gguf_file(spec, gguf_file)
    return spec


def load_tokenizer(spec: str, *, gguf_file: str | None = None, what: str = "tokenizer"):
    """The tokenizer of a folder, a Hub id, a GGUF file (``gguf_file=``), ``pretrained:<name>`` or
    ``tiny:<model_type>`` (the built-in tiny tokenizer)."""
    check_source(spec, what)
    if spec.startswith("tiny:"):
        return tiny_tokenizer()
    from transformers import AutoTokenizer

    source = _resolve(spec, gguf_file)
    try:
        return AutoTokenizer.from_pretrained(source, **({"gguf_file": gguf_file} if gguf_file else {}))
    except OSError as e:
        raise FileNotFoundError(f"cannot load the {what} {spec!r}: {_first_line(e)}") from None


def _plain_config(source: str):
    """The folder's config with a leftover gguf ``quantization_config`` dropped; ValueError for any
    other quantization (soteria edits plain floating-point weights); None when there is no config."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError):
        return None  # from_pretrained reports it with its own message
    if is_gguf_config(config):
        return strip_gguf_config(config)
    qc = getattr(config, "quantization_config", None)
    if qc is not None:
        method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", "?")
        raise ValueError(
            f"{source} is quantized ({method}); soteria edits floating-point weights: load the unquantized model"
        )
    return None


def load_causal_lm(
    spec: str, *, dtype: str = "auto", device: str | None = None, gguf_file: str | None = None, what: str = "model"
):
    """An eval-mode causal LM from a folder, a Hub id, a GGUF file in a folder (``gguf_file=``,
    dequantized), ``pretrained:<name>`` or ``tiny:<model_type>`` (built locally).

    ``device``: a torch device (``cpu``, ``cuda:1``) or an accelerate device map (``auto``).
    On CPU no ``device_map`` is passed (accelerate is not needed). A bad spec, dtype, device or
    GGUF file is a FileNotFoundError / ValueError naming it, raised before any weight is read.
    The model saves as plain safetensors (a GGUF model's quantization record is dropped).
    """
    check_source(spec, what)
    device = check_device(device)
    torch_dtype = _dtype(dtype)
    if spec.startswith("tiny:"):
        import torch

        if gguf_file is not None:
            _resolve(spec, gguf_file)
        model = tiny_model(spec.split(":", 1)[1], **({} if torch_dtype == "auto" else {"dtype": torch_dtype}))
        if device in DEVICE_MAPS:  # one small model: the first GPU, else the CPU
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device is not None:
            model = model.to(device)
        return model.eval()

    from transformers import AutoModelForCausalLM

    source = _resolve(spec, gguf_file)
    kwargs = {"dtype": torch_dtype}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    else:
        config = _plain_config(source)
        if config is not None:
            kwargs["config"] = config
    if device in DEVICE_MAPS:
        import torch

        if torch.cuda.is_available():
            kwargs["device_map"] = device
        else:
            device = None  # one CPU: nothing to split, and no accelerate needed
    elif device is not None and device != "cpu":
        kwargs["device_map"] = device
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as e:
        raise FileNotFoundError(f"cannot load {what} {spec!r}: {_first_line(e)}") from None
    except SafetensorError as e:
        raise ValueError(f"cannot load {what} {spec!r}: a safetensors file is corrupt or cut short ({e}); "
                         "download or save it again") from None  # fmt: skip
    return dequantized(model).eval()


def load_model(spec: str, *, dtype: str = "auto", device: str | None = None, gguf_file: str | None = None):
    """``(model, tokenizer)`` (see :func:`load_causal_lm`); the tokenizer is loaded first, so a
    folder without one fails before the weights are read."""
    tokenizer = load_tokenizer(check_source(spec), gguf_file=gguf_file)
    return load_causal_lm(spec, dtype=dtype, device=device, gguf_file=gguf_file), tokenizer


def meta_model(source: str, *, trust_remote_code: bool = False):
    """The causal LM of the config at ``source`` (a folder or Hub id) built on the ``meta`` device:
    its architecture, no weight allocated or read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def model_shape(spec: str, *, gguf_file: str | None = None) -> tuple[int, int] | None:
    """``(layers, heads)`` of the model ``spec`` names, from its config alone (no weight is read),
    so that head lists can be checked before the load; None when the config cannot tell (a GGUF
    file, a folder without a readable config)."""
    check_source(spec)
    if gguf_file is not None:
        return None
    if spec.startswith("tiny:"):
        return num_layers_heads(tiny_model(spec.split(":", 1)[1]))
    source = _resolve(spec, None)
    if _plain_config(source) is None:
        return None
    try:
        return num_layers_heads(meta_model(source))
    except (OSError, ValueError):
        return None
