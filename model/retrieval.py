"""``RetrievalModel``: the whole retrieval stage as one ``nn.Module``.

user features → user tower → query embedding → ``ItemIndex`` (probe, Bloom
filter in the scan, int8 dot-product scoring, exact verification) → top-k.
A request that already carries a query embedding skips the tower (identity).
Later stages (OverArch reranking, multi-task heads, value model) slot in
after the index as further submodules of this one module.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from sterling.model.artifact import read_artifact, write_artifact
from sterling.model.errors import (
    ArtifactError,
    DimensionMismatchError,
    InvalidInputError,
    NonFiniteError,
)
from sterling.model.index import ItemIndex
from sterling.model.stages import staged

__all__ = ["UserTower", "RetrievalModel", "RetrievalOutput"]


class UserTower(nn.Module):
    """A small MLP from dense user features to the item embedding space.

    Example:
        >>> tower = UserTower(UserTower.Config(input_dim=32, hidden_dims=(128,), output_dim=64))
        >>> q = tower(torch.randn(8, 32))  # [8, 64]
    """

    @dataclass(kw_only=True, slots=True)
    class Config:
        input_dim: int
        output_dim: int
        hidden_dims: tuple[int, ...] = (256,)

        def __post_init__(self) -> None:
            self.hidden_dims = tuple(self.hidden_dims)
            if self.input_dim < 1 or self.output_dim < 1 or any(h < 1 for h in self.hidden_dims):
                raise InvalidInputError(f"tower dimensions must be ≥ 1, got {self}")

    def __init__(self, config: UserTower.Config) -> None:
        super().__init__()
        self.config = config
        dims = (config.input_dim, *config.hidden_dims)
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(dims[-1], config.output_dim))
        self.mlp = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features)


class RetrievalOutput(NamedTuple):
    ids: torch.Tensor  # [B, k] int64, −1 padded
    scores: torch.Tensor  # [B, k] fp32, −inf padded
    version: int


class RetrievalModel(nn.Module):
    """One module, one forward pass: tower → index search → top-k.

    Example:
        >>> model = RetrievalModel(index, tower=None)
        >>> out = model(query=xq, k=100, where="lang:en")
        >>> model.save("model.st"); model = RetrievalModel.load("model.st")
    """

    def __init__(self, index: ItemIndex, tower: UserTower | None = None) -> None:
        super().__init__()
        if tower is not None and tower.config.output_dim != index.dim:
            raise DimensionMismatchError(
                f"tower output_dim ({tower.config.output_dim}) must equal the index dimension ({index.dim})"
            )
        self.index = index
        self.tower = tower

    @torch.no_grad()
    @staged("tower")
    def encode(self, *, query=None, user_features=None) -> torch.Tensor:
        """Query embeddings from either a given embedding or user features."""
        if (query is None) == (user_features is None):
            raise InvalidInputError("give exactly one of `query` (an embedding) or `user_features`")
        if query is not None:
            return torch.as_tensor(query)
        if self.tower is None:
            raise InvalidInputError("this model has no user tower; send a query embedding instead")
        feats = torch.as_tensor(user_features, dtype=torch.float32)
        if feats.ndim == 1:
            feats = feats[None]
        if feats.ndim != 2 or feats.shape[1] != self.tower.config.input_dim:
            raise DimensionMismatchError(
                f"user features have shape {tuple(feats.shape)}; the tower expects [B, {self.tower.config.input_dim}]"
            )
        if not bool(torch.isfinite(feats).all()):
            raise NonFiniteError("user features contain NaN or inf")
        return self.tower(feats)

    def forward(
        self,
        query=None,
        user_features=None,
        *,
        k: int = 10,
        nprobe: int | None = None,
        where: str | list[str | None] | None = None,
        exact: bool = True,
        adaptive: bool | None = None,
    ) -> RetrievalOutput:
        xq = self.encode(query=query, user_features=user_features)
        scores, ids = self.index.search(xq, k=k, nprobe=nprobe, where=where, exact=exact, adaptive=adaptive)
        return RetrievalOutput(ids=ids, scores=scores, version=int(self.index.version))

    # ------------------------------------------------------------- artifact
    def save(self, path: str | Path) -> None:
        """One artifact file, atomic, with format version and checksum."""
        tensors = {f"index.{n}": t for n, t in self.index.tensors().items()}
        meta: dict = {"index": self.index.meta(), "tower": None}
        if self.tower is not None:
            tensors.update({f"tower.{n}": t for n, t in self.tower.state_dict().items()})
            meta["tower"] = asdict(self.tower.config)
        write_artifact(path, kind="retrieval_model", meta=meta, tensors=tensors)

    @classmethod
    def load(cls, path: str | Path, *, verify: bool = True) -> RetrievalModel:
        h, tensors = read_artifact(path, verify=verify)
        if h["kind"] == "item_index":
            return cls(ItemIndex.load(path, verify=False))
        if h["kind"] != "retrieval_model":
            raise ArtifactError(f"{path} holds a {h['kind']!r}, not a retrieval model")
        index = ItemIndex.from_parts(
            h["meta"]["index"], {n[6:]: t for n, t in tensors.items() if n.startswith("index.")}
        )
        tower = None
        if h["meta"].get("tower"):
            tower = UserTower(UserTower.Config(**h["meta"]["tower"]))
            state = {n[6:]: t for n, t in tensors.items() if n.startswith("tower.")}
            tower.load_state_dict(state, assign=True)
        return cls(index, tower)
