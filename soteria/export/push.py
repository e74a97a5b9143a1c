"""Push a saved steered model to the Hugging Face Hub, with Hub failures in plain words.

``create_repo(exist_ok=True)`` + ``upload_folder`` through huggingface_hub; the folder is
checked first (a soteria record, every shard present), and any Hub error becomes a
:class:`SoteriaHubError` with one sentence (:func:`soteria.io.hub.plain_hub_error`).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..io.checkpoint import INDEX_NAME, SINGLE_NAME, shard_files
from ..io.hub import plain_hub_error
from ..io.safetensors import read_safetensors
from ..steer.config import SoteriaConfig
from .card import CONFIG_NAME, PATCH_FORMAT, PATCH_NAME

__all__ = ["SoteriaHubError", "push_to_hub"]


class SoteriaHubError(RuntimeError):
    """A Hub operation failed; the message says why in plain words (the original is ``__cause__``)."""


def _check_patch(folder: Path) -> SoteriaConfig:
    meta = read_safetensors(folder / PATCH_NAME).metadata
    if meta.get("format") != PATCH_FORMAT or "soteria_config" not in meta:
        raise ValueError(f"{folder / PATCH_NAME} is not a soteria patch (metadata format {meta.get('format')!r})")
    return SoteriaConfig.from_json(meta["soteria_config"])


def _check_folder(folder: Path) -> SoteriaConfig:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a directory")
    if (folder / PATCH_NAME).is_file() and not (folder / CONFIG_NAME).exists():
        return _check_patch(folder)
    missing = [n for n in ("config.json", CONFIG_NAME) if not (folder / n).is_file()]
    if missing:
        raise ValueError(
            f"{folder} is not a soteria output (missing {', '.join(missing)}); "
            "push a folder written by `soteria steer` (save_steered / steer_checkpoint / SoteriaPatch.save in Python)"
        )
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith(".") and (".tmp-" in p.name)]
    if leftovers:
        raise ValueError(f"{folder} holds unfinished temporary files {leftovers}; rewrite the folder")
    try:
        shards = shard_files(folder)
    except RuntimeError:
        raise ValueError(f"{folder} has no safetensors weights ({SINGLE_NAME} or {INDEX_NAME})") from None
    absent = [p.name for p in shards if not p.is_file()]
    if absent:
        raise ValueError(f"{folder}: shards listed in the index are missing: {absent}")
    return SoteriaConfig.from_json((folder / CONFIG_NAME).read_text(encoding="utf-8"))


def push_to_hub(
    out_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = True,
    token: str | None = None,
    commit_message: str | None = None,
):
    """Upload a folder written by :func:`save_steered`, :func:`steer_checkpoint` or
    :meth:`SoteriaPatch.save` to the Hub.

    Creates ``repo_id`` if needed (``private`` by default; an existing repo keeps its
    visibility), then uploads the folder in one commit. Returns huggingface_hub's
    ``CommitInfo`` (``.commit_url``). Checks the folder first (config, weights,
    ``soteria_config.json``); a Hub failure raises :class:`SoteriaHubError` saying what went wrong.
    """
    folder = Path(out_dir)
    config = _check_folder(folder)
    if not isinstance(repo_id, str) or not repo_id.strip():
        raise ValueError(f"repo_id must be a non-empty str like 'your-name/model-soteria', got {repo_id!r}")
    if commit_message is None:
        what = "soteria patch" if (folder / PATCH_NAME).is_file() else "soteria-steered model"
        commit_message = f"Upload {what} ({', '.join(config.languages)})"
    return _upload(folder, repo_id, private=private, token=token, commit_message=commit_message)


def _upload(folder: Path, repo_id: str, *, private: bool, token: str | None, commit_message: str):
    """``create_repo(exist_ok=True)`` and ``upload_folder`` in one commit; Hub errors as :class:`SoteriaHubError`."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
    except Exception as e:
        raise SoteriaHubError(plain_hub_error(e, f"create the repository {repo_id!r}", repo_id)) from e
    target = getattr(url, "repo_id", None) or repo_id
    try:
        return api.upload_folder(
            repo_id=target,
            folder_path=folder,
            commit_message=commit_message,
            token=token,
            repo_type="model",
        )
    except Exception as e:
        raise SoteriaHubError(plain_hub_error(e, f"upload {folder} to {target!r}", target)) from e
