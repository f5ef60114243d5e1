"""Sentence embeddings as the checkpoint's own sentence-transformers
pipeline makes them: ``modules.json`` lists the modules (Transformer, then
Pooling, then optionally Normalize), ``1_Pooling/config.json`` the pooling
modes. A checkpoint without ``modules.json`` pools by the mean over its
valid tokens, unnormalised (what ``mean_pooled`` is)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

_ST = "sentence_transformers.models."
# sentence-transformers' pooling modes and their legacy config keys, in the
# order its Pooling concatenates legacy configs (a ``pooling_mode`` list keeps its own order)
_LEGACY = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max", "pooling_mode_mean_tokens": "mean",
           "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
           "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens")  # the ones reproduced here


@dataclass(frozen=True)
class SentencePooling:
    """How token rows become one embedding: the pooling ``modes``
    (concatenated in sentence-transformers' order) and whether the result is
    scaled to unit length (a ``Normalize`` module)."""

    modes: tuple[str, ...] = ("mean",)
    normalize: bool = False

    @classmethod
    def from_folder(cls, folder: Path | None) -> "SentencePooling":
        """The pipeline of the checkpoint in ``folder`` (the mean, unnormalised,
        when it has no modules.json). Raises ValueError naming the file and
        the module for a pipeline this cannot reproduce."""
        if folder is None or not (Path(folder) / "modules.json").is_file():
            return cls()
        folder = Path(folder)
        try:
            modules = json.loads((folder / "modules.json").read_text())
            kinds = [(m["type"], m.get("path", "")) for m in modules]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"modules.json: not a sentence-transformers module list ({exc})") from None
        modes, normalize = cls().modes, False
        for kind, path in kinds:
            name = kind.removeprefix(_ST)
            if name == "Transformer":
                continue
            if name == "Pooling":
                modes = _pooling_modes(folder / path / "config.json")
            elif name == "Normalize":
                normalize = True
            else:
                raise ValueError(f"modules.json: the module {kind} is not supported (prism_ext applies "
                                 f"Transformer, Pooling and Normalize)")
        return cls(modes, normalize)

    @property
    def outputs(self) -> tuple[str, ...]:
        """The run outputs the embedding needs: ``pooled`` (each device sends
        its rows' sum and count, not its rows) for means alone, else every
        row (``rows``)."""
        return ("pooled",) if set(self.modes) <= {"mean", "mean_sqrt_len_tokens"} else ("rows",)

    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Embeddings [B, D] of ``hidden`` [B, N, d] over the valid positions of ``mask`` [B, N]."""
        valid = mask.bool()[..., None]
        counts = valid.sum(1).clamp(min=1)
        parts = []
        for mode in self.modes:
            if mode == "cls":
                parts.append(hidden[:, 0])
            elif mode == "max":
                parts.append(hidden.masked_fill(~valid, float("-inf")).max(1).values)
            else:
                mean = (hidden * valid).sum(1) / counts
                parts.append(mean if mode == "mean" else mean * counts.sqrt())
        return self._finish(torch.cat(parts, dim=-1))

    def from_means(self, means: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Embeddings [B, D] from the mean over valid positions [B, d] and their counts [B]."""
        parts = [means if mode == "mean" else means * counts.clamp(min=1).to(means.dtype).sqrt()[:, None]
                 for mode in self.modes]
        return self._finish(torch.cat(parts, dim=-1))

    def _finish(self, emb: torch.Tensor) -> torch.Tensor:
        # sentence-transformers' Normalize: F.normalize(p=2, dim=1), which divides by max(norm, 1e-12)
        return torch.nn.functional.normalize(emb, p=2, dim=1) if self.normalize else emb


def _pooling_modes(path: Path) -> tuple[str, ...]:
    """The modes of a Pooling module's config.json: ``pooling_mode`` (a
    name or a list of them, sentence-transformers >= 5) or the legacy
    ``pooling_mode_*`` flags."""
    where = f"{path.parent.name}/{path.name}"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{where}: cannot read the pooling configuration ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{where}: expected a JSON object")
    if "pooling_mode" in config:
        mode = config["pooling_mode"]
        modes = (mode,) if isinstance(mode, str) else tuple(mode) if isinstance(mode, list) else None
    else:
        modes = tuple(mode for key, mode in _LEGACY.items() if config.get(key)) or ("mean",)
    if not modes or not all(isinstance(m, str) for m in modes):
        raise ValueError(f"{where}: pooling_mode: expected a mode name or a list of them")
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"{where}: the pooling mode {bad[0]!r} is not supported (prism_ext pools by "
                         f"{', '.join(MODES)})")
    return modes
