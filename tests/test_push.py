"""soteria.push_to_hub: the huggingface_hub calls made, the folder uploaded, errors in plain words.

The Hub cannot be reached from the test machines: HfApi.create_repo / upload_folder are
patched (autospec, so the calls must match huggingface_hub's real signatures), except in the
offline test, which runs the real client with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace
from unittest import mock

import httpx2
import pytest
from huggingface_hub import HfApi
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    LocalTokenNotFoundError,
    RepositoryNotFoundError,
)

from soteria import HarmVector, SoteriaPatcher, push_to_hub, save_steered
from soteria.export import SoteriaHubError
from soteria.models.tiny import tiny_model, tiny_tokenizer

EXPECTED = {
    "README.md",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "soteria_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    base = tiny_model("llama", seed=0)
    harmful = tiny_model("llama", seed=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SOTERIA_BACKEND", "eager")
        SoteriaPatcher.apply(base, ["fr", "de"], heads=[(0, 1), (1, 2)], harm=HarmVector.from_models(base, harmful),
                             progress=False)  # fmt: skip
    return save_steered(base, tmp_path_factory.mktemp("push") / "steered", tokenizer=tiny_tokenizer())


@pytest.fixture
def hub():
    """Patched HfApi methods; ``hub.uploaded`` lists the folder's files at upload time."""
    uploaded: list[set[str]] = []

    def upload(self, *, repo_id, folder_path, **kwargs):
        uploaded.append({p.relative_to(folder_path).as_posix() for p in folder_path.rglob("*") if p.is_file()})
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/abc", oid="abc")

    with (
        mock.patch.object(HfApi, "create_repo", autospec=True) as create,
        mock.patch.object(HfApi, "upload_folder", autospec=True, side_effect=upload) as up,
    ):
        create.side_effect = lambda self, repo_id, **kw: SimpleNamespace(
            repo_id=repo_id if "/" in repo_id else f"me/{repo_id}"
        )
        yield SimpleNamespace(create=create, upload=up, uploaded=uploaded)


def test_calls_and_uploaded_folder(folder, hub):
    info = push_to_hub(folder, "me/llama-soteria", token="hf_secret")
    assert info.commit_url == "https://huggingface.co/me/llama-soteria/commit/abc"
    hub.create.assert_called_once()
    _, args, kwargs = hub.create.mock_calls[0]
    assert args[1:] == ("me/llama-soteria",)
    assert kwargs == dict(token="hf_secret", private=True, repo_type="model", exist_ok=True)
    hub.upload.assert_called_once()
    kwargs = hub.upload.call_args.kwargs
    assert kwargs["repo_id"] == "me/llama-soteria" and kwargs["folder_path"] == folder
    assert kwargs["token"] == "hf_secret" and kwargs["repo_type"] == "model"
    assert kwargs["commit_message"] == "Upload soteria-steered model (fr, de)"
    assert hub.uploaded == [EXPECTED]


def test_public_repo_custom_message_and_namespace(folder, hub):
    push_to_hub(folder, "llama-soteria", private=False, commit_message="v2: stronger scale")
    assert hub.create.call_args.kwargs["private"] is False
    kwargs = hub.upload.call_args.kwargs
    assert kwargs["repo_id"] == "me/llama-soteria"  # the id create_repo resolved, with the user's namespace
    assert kwargs["commit_message"] == "v2: stronger scale" and kwargs["token"] is None


def _http_error(cls, status: int, server_message: str | None = None):
    request = httpx2.Request("POST", "https://huggingface.co/api/repos/create")
    return cls(f"{status} Client Error", response=httpx2.Response(status, request=request),
               server_message=server_message)  # fmt: skip


@pytest.mark.parametrize(
    "error, match",
    [
        (lambda: _http_error(HfHubHTTPError, 401), r"rejected the credentials \(401\).*hf auth login"),
        (
            lambda: _http_error(HfHubHTTPError, 403, "You don't have the rights"),
            r"permission denied \(403\).*write access.*server: You don't have the rights",
        ),  # fmt: skip
        (lambda: _http_error(RepositoryNotFoundError, 404), "was not found or this token cannot see it"),
        (lambda: _http_error(HfHubHTTPError, 429), r"rate-limiting.*\(429\)"),
        (lambda: _http_error(HfHubHTTPError, 503), r"server error \(503\); retry later"),
        (lambda: httpx2.ConnectError("[Errno -2] Name or service not known"), "could not reach the Hugging Face Hub"),
        (lambda: LocalTokenNotFoundError("no token"), "no Hugging Face token found: run `hf auth login`"),
        (lambda: HFValidationError("Repo id must be in the form"), "is not a valid Hub repo id"),
    ],
)
def test_create_errors_in_plain_words(folder, hub, error, match):
    exc = error()
    hub.create.side_effect = exc
    with pytest.raises(SoteriaHubError, match=match) as info:
        push_to_hub(folder, "me/llama-soteria")
    assert str(info.value).startswith("cannot create the repository 'me/llama-soteria': ")
    assert info.value.__cause__ is exc
    hub.upload.assert_not_called()


def test_upload_error_in_plain_words(folder, hub):
    exc = _http_error(HfHubHTTPError, 403)
    hub.upload.side_effect = exc
    with pytest.raises(SoteriaHubError, match=r"cannot upload .* to 'me/llama-soteria': permission denied") as info:
        push_to_hub(folder, "me/llama-soteria")
    assert info.value.__cause__ is exc


def test_offline_real_client(folder, monkeypatch):
    """No patching: the real huggingface_hub client refuses in offline mode, and we say so."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SoteriaHubError, match=r"switched off on this machine \(HF_HUB_OFFLINE=1\)"):
        push_to_hub(folder, "me/llama-soteria", token="hf_fake")


def test_folder_checked_before_any_call(folder, hub, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        push_to_hub(tmp_path / "missing", "me/x")
    plain = tmp_path / "plain"
    tiny_model("llama").save_pretrained(plain)
    with pytest.raises(ValueError, match=r"not a soteria output \(missing soteria_config.json\)"):
        push_to_hub(plain, "me/x")
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model-00002.safetensors"}}))
    with pytest.raises(ValueError, match=r"missing: \['model-00002.safetensors'\]"):
        push_to_hub(broken, "me/x")
    with pytest.raises(ValueError, match="repo_id must be a non-empty str"):
        push_to_hub(folder, " ")
    hub.create.assert_not_called()
    hub.upload.assert_not_called()
