"""A steering as a small file, like a PEFT adapter: :class:`SoteriaPatch`.

A patch is the edit itself: for every steered head ``(l, h)`` the new value of its slice of
layer ``l``'s output projection, exactly as :meth:`soteria.SoteriaPatcher.apply` wrote it (in
the weight's dtype), in one safetensors file whose metadata holds the :class:`SoteriaConfig`,
the base model's id and revision when known, and a fingerprint (sha256, shape, dtype) of every
base tensor it changes. New values rather than deltas make applying exact on every device: the
weights are bit-identical to the steering that made it, where a delta would be rounded again
when added. The file is the edited slices' bytes plus a header of a few KB::

    patch = SoteriaPatch.from_model(steered)           # a model steered in this process
    patch.save("my-patch")                             # my-patch/soteria_patch.safetensors, README.md
    patch = SoteriaPatch.from_pretrained("my-patch")   # or a Hub id
    patch.apply(base)                                  # refused unless base is that base model
    SoteriaPatcher.revert(base)                        # bit-exact undo

Tensor ``"layers.{l}.heads.{h}"`` is :meth:`soteria.arch.HeadSite.head_slice` of the weight:
``[d_model, D]`` for ``nn.Linear``, ``[D, d_model]`` for GPT-2's Conv1D.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..arch import head_sites, unwrap_model
from ..io.atomic import atomic_directory
from ..io.fingerprint import fingerprint
from ..io.hub import hub_repo_id, looks_like_repo_id, plain_hub_error
from ..io.safetensors import read_safetensors, read_tensor, save_tensors
from ..steer import SoteriaConfig, SoteriaPatcher
from ..steer.offload import editable_weight
from .card import PATCH_FORMAT, PATCH_NAME, patch_card
from .push import SoteriaHubError, push_to_hub

__all__ = ["SoteriaPatch"]

_KEY = re.compile(r"layers\.(\d+)\.heads\.(\d+)")


def _key(layer: int, head: int) -> str:
    return f"layers.{layer}.heads.{head}"


@dataclass
class SoteriaPatch:
    """The steered heads' new slices, the record of the steering and the base it applies to.

    ``slices[(layer, head)]``: CPU tensor, the slice's new value; ``fingerprints[layer]``: the
    base weight's :func:`soteria.io.fingerprint.fingerprint`; ``damage``: the harmless-prompt KL
    measured when it was written (:func:`soteria.export.damage.damage_check`), if any.
    """

    config: SoteriaConfig
    slices: dict[tuple[int, int], torch.Tensor]
    fingerprints: dict[int, dict[str, Any]]
    base_model: str | None = None
    base_revision: str | None = None
    damage: dict[str, Any] | None = None

    def __post_init__(self):
        union = set(self.config.head_union)
        if set(self.slices) != union:
            raise ValueError(
                f"a patch needs one slice per head of its config: extra {sorted(set(self.slices) - union)}, "
                f"missing {sorted(union - set(self.slices))}"
            )
        layers = {layer for layer, _ in union}
        if set(self.fingerprints) != layers:
            raise ValueError(f"a patch needs a fingerprint of layers {sorted(layers)}, has {sorted(self.fingerprints)}")

    def __repr__(self) -> str:
        return (
            f"SoteriaPatch(languages={self.config.languages}, heads={len(self.slices)}, "
            f"base_model={self.base_model!r}, nbytes={self.nbytes})"
        )

    @property
    def nbytes(self) -> int:
        """Bytes of the slices (the file adds its header)."""
        return sum(t.numel() * t.element_size() for t in self.slices.values())

    # ------------------------------------------------------------------ make and apply

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        *,
        base_model: str | None = None,
        base_revision: str | None = None,
        damage: dict[str, Any] | None = None,
    ) -> SoteriaPatch:
        """The patch of a model steered by :meth:`SoteriaPatcher.apply` in this process.

        ``base_model`` / ``base_revision`` default to ``config.name_or_path`` (when it is a Hub id)
        and the commit transformers recorded when it loaded the model from the Hub.
        """
        if not SoteriaPatcher.has_originals(model):
            raise ValueError(
                "SoteriaPatch.from_model needs a model steered by SoteriaPatcher.apply in this process "
                "(its base weights are needed for the fingerprints)"
            )
        inner = unwrap_model(model)
        config = SoteriaPatcher.config(model)
        sites = head_sites(model)
        union = config.head_union
        layers = sorted({layer for layer, _ in union})
        with SoteriaPatcher.unsteered(model):
            prints = {layer: fingerprint(editable_weight(inner, sites[layer], [])) for layer in layers}
        weights = {layer: editable_weight(inner, sites[layer], []).detach() for layer in layers}
        slices = {(l, h): sites[l].head_slice(weights[l], h).to("cpu", copy=True).contiguous() for l, h in union}  # noqa: E741
        hf = getattr(inner, "config", None)
        if base_model is None:
            base_model = hub_repo_id(getattr(hf, "name_or_path", None))
        if base_revision is None:
            base_revision = getattr(hf, "_commit_hash", None) if base_model else None
        return cls(config, slices, prints, base_model, base_revision, damage)

    def apply(self, model: nn.Module) -> nn.Module:
        """Write the slices into ``model`` (in place) and return it; weights become bit-identical to
        the steering that made the patch. A model whose edited tensors differ from the patch's base
        (fingerprints) is refused and left unchanged; :meth:`SoteriaPatcher.revert` undoes it."""
        return SoteriaPatcher.write_slices(model, self.config, self.slices, self.fingerprints)

    # ------------------------------------------------------------------ files and the Hub

    def _metadata(self) -> dict[str, str]:
        prints = {str(layer): fp for layer, fp in sorted(self.fingerprints.items())}
        return {
            "format": PATCH_FORMAT,
            "soteria_config": self.config.to_json(indent=None),
            "base_model": self.base_model or "",
            "base_revision": self.base_revision or "",
            "fingerprints": json.dumps(prints, sort_keys=True, separators=(",", ":")),
            "damage": json.dumps(self.damage, sort_keys=True) if self.damage is not None else "",
        }

    def save(self, out_dir: str | os.PathLike, *, overwrite: bool = False, repo_id: str | None = None) -> Path:
        """Write ``out_dir/soteria_patch.safetensors`` and its card ``README.md``, atomically; return ``out_dir``.

        ``overwrite`` replaces only an empty folder or an earlier patch; ``repo_id`` names the patch in the card.
        """
        out = Path(os.path.abspath(out_dir))
        tensors = {_key(layer, h): t for (layer, h), t in sorted(self.slices.items())}
        with atomic_directory(out, overwrite=overwrite, ours=PATCH_NAME) as tmp:
            save_tensors(tensors, tmp / PATCH_NAME, self._metadata())
            card = patch_card(
                self.config,
                base_model=self.base_model,
                base_revision=self.base_revision,
                model_id=repo_id or out.name,
                n_changed=sum(t.numel() for t in self.slices.values()),
                n_bytes=(tmp / PATCH_NAME).stat().st_size,
                damage=self.damage,
            )
            (tmp / "README.md").write_text(card, encoding="utf-8")
        return out

    @classmethod
    def from_pretrained(
        cls,
        source: str | os.PathLike,
        *,
        revision: str | None = None,
        token: str | None = None,
        cache_dir: str | None = None,
        local_files_only: bool = False,
    ) -> SoteriaPatch:
        """Read a patch: a folder written by :meth:`save`, its ``soteria_patch.safetensors``, or a Hub
        repo id (``revision``, ``token``, ``cache_dir``, ``local_files_only`` go to ``hf_hub_download``)."""
        path = Path(source)
        if path.is_dir():
            path = path / PATCH_NAME
            if not path.is_file():
                raise FileNotFoundError(f"{source} holds no {PATCH_NAME}: not a soteria patch folder")
        elif not path.is_file():
            if not looks_like_repo_id(str(source)):
                raise ValueError(f"{str(source)!r} is neither a patch folder or file nor a Hub repo id")
            path = _download(str(source), revision, token, cache_dir, local_files_only)
        sf = read_safetensors(path)
        meta = sf.metadata
        if meta.get("format") != PATCH_FORMAT:
            raise ValueError(f"{path} is not a soteria patch (metadata format {meta.get('format')!r})")
        try:
            config = SoteriaConfig.from_json(meta["soteria_config"])
            prints = {int(k): v for k, v in json.loads(meta["fingerprints"]).items()}
            damage = json.loads(meta["damage"]) if meta.get("damage") else None
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"{path}: unreadable patch metadata ({e})") from None
        slices = {}
        for name, _ in sf.tensors():
            m = _KEY.fullmatch(name)
            if m is None:
                raise ValueError(f"{path}: unexpected tensor {name!r} in a soteria patch")
            slices[(int(m[1]), int(m[2]))] = read_tensor(sf, name)
        return cls(config, slices, prints, meta.get("base_model") or None, meta.get("base_revision") or None, damage)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool = True,
        token: str | None = None,
        commit_message: str | None = None,
    ):
        """Upload the patch (file and card) to a Hub model repo, created if needed (private by
        default); returns huggingface_hub's ``CommitInfo``. Hub failures raise :class:`SoteriaHubError`."""
        if not isinstance(repo_id, str) or not repo_id.strip():
            raise ValueError(f"repo_id must be a non-empty str like 'your-name/model-soteria-patch', got {repo_id!r}")
        with tempfile.TemporaryDirectory(prefix="soteria-patch-") as tmp:
            folder = self.save(Path(tmp) / "patch", repo_id=repo_id)
            return push_to_hub(folder, repo_id, private=private, token=token, commit_message=commit_message)


def _download(repo_id: str, revision, token, cache_dir, local_files_only) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(
            hf_hub_download(
                repo_id,
                PATCH_NAME,
                revision=revision,
                token=token,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
            )
        )
    except Exception as e:
        raise SoteriaHubError(plain_hub_error(e, f"download {PATCH_NAME} from {repo_id!r}", repo_id)) from e
