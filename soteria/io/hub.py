"""The Hugging Face Hub: what counts as a repo id, and Hub errors in one plain sentence."""

from __future__ import annotations

import os
import re
from typing import Any

__all__ = ["hub_repo_id", "looks_like_repo_id", "plain_hub_error"]

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def looks_like_repo_id(name: Any, *, namespaced: bool = False) -> bool:
    """``name`` has the shape of a Hub repo id (``name`` or ``namespace/name``; with
    ``namespaced``, only the latter). Says nothing of whether the repository exists."""
    if not isinstance(name, str) or not _REPO_ID.fullmatch(name) or ".." in name:
        return False
    return "/" in name or not namespaced


def hub_repo_id(name: Any) -> str | None:
    """``name`` if it is a ``namespace/name`` Hub id and not an existing local path, else None
    (for the model card's ``base_model``)."""
    return name if looks_like_repo_id(name, namespaced=True) and not os.path.exists(name) else None


def plain_hub_error(e: Exception, action: str, repo_id: str) -> str:
    """One sentence saying what went wrong with ``action`` on ``repo_id`` and what to do."""
    from huggingface_hub import errors

    try:
        import httpx2 as _http
    except ImportError:  # pragma: no cover - older huggingface_hub
        _http = None
    if isinstance(e, errors.HFValidationError):
        return f"cannot {action}: {repo_id!r} is not a valid Hub repo id ('name' or 'namespace/name'): {e}"
    if isinstance(e, errors.LocalTokenNotFoundError):
        return f"cannot {action}: no Hugging Face token found: run `hf auth login`, set HF_TOKEN, or pass token="
    if isinstance(e, errors.OfflineModeIsEnabled):
        return (
            f"cannot {action}: the Hugging Face Hub is switched off on this machine (HF_HUB_OFFLINE=1); "
            "unset it on a machine with network access"
        )
    if isinstance(e, errors.HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        detail = f" (server: {e.server_message.strip()})" if getattr(e, "server_message", None) else ""
        if isinstance(e, errors.RepositoryNotFoundError) or status == 404:
            return (
                f"cannot {action}: repository {repo_id!r} was not found or this token cannot see it; "
                f"check the name and the token's permissions{detail}"
            )
        if status == 401:
            return (
                f"cannot {action}: the Hub rejected the credentials (401): the token is missing, invalid or "
                f"expired; run `hf auth login` or pass a valid token={detail}"
            )
        if status == 403:
            return (
                f"cannot {action}: permission denied (403): this token cannot write to {repo_id!r}; use a token "
                f"with write access to that namespace{detail}"
            )
        if status == 429:
            return f"cannot {action}: the Hub is rate-limiting these requests (429); wait and retry{detail}"
        if status is not None and status >= 500:
            return f"cannot {action}: the Hub had a server error ({status}); retry later{detail}"
        return f"cannot {action}: the Hub answered {status}{detail}: {e}"
    network = (ConnectionError, TimeoutError) + ((_http.TransportError,) if _http else ())
    if isinstance(e, network):
        return (
            f"cannot {action}: could not reach the Hugging Face Hub ({type(e).__name__}: {e}); "
            "check the network or proxy"
        )
    return f"cannot {action}: {type(e).__name__}: {e}"
