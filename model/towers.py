"""Towers on TorchRec: an ``EmbeddingBagCollection`` over sparse features (a ``KeyedJaggedTensor``),
concatenated with dense features, then an MLP → an L2-normalised embedding.

torchrec is imported lazily (in ``Tower.__init__`` and ``make_kjt``) so that
``sterling.model``'s index path imports without it. Table names get a ``t_``
prefix: a table named like a ``ModuleDict`` method (``items``, ``keys``)
would not build.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sterling.model.errors import InvalidInputError

__all__ = ["SparseFeature", "Tower", "make_kjt"]


@dataclass(kw_only=True, slots=True)
class SparseFeature:
    """One sparse input: ``num_embeddings`` rows (vocabulary + OOV buckets) of width ``dim``, mean-pooled."""

    name: str
    num_embeddings: int
    dim: int = 32

    def __post_init__(self) -> None:
        if self.num_embeddings < 1 or self.dim < 1:
            raise InvalidInputError(f"sparse feature {self.name!r}: num_embeddings and dim must be ≥ 1, got {self}")


def make_kjt(keys: list[str], values: list[np.ndarray], lengths: list[np.ndarray]):
    """A ``KeyedJaggedTensor`` from per-key flat ids and [B] lengths (key-major, as TorchRec lays it out)."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    v = torch.from_numpy(np.concatenate(values).astype(np.int64)) if values else torch.empty(0, dtype=torch.int64)
    ln = torch.from_numpy(np.concatenate(lengths).astype(np.int32)) if lengths else torch.empty(0, dtype=torch.int32)
    return KeyedJaggedTensor.from_lengths_sync(keys=list(keys), values=v, lengths=ln)


class Tower(nn.Module):
    """Sparse (EBC over a KJT) + dense → MLP → unit-norm embedding.

    Example:
        >>> tower = Tower(Tower.Config(sparse=(SparseFeature(name="item_id", num_embeddings=1000),),
        ...                            dense_dim=0, output_dim=64))
        >>> kjt = make_kjt(["item_id"], [np.array([3, 7])], [np.array([1, 1])])
        >>> e = tower(kjt)  # [2, 64]
    """

    @dataclass(kw_only=True, slots=True)
    class Config:
        sparse: tuple[SparseFeature, ...]
        dense_dim: int = 0
        hidden_dims: tuple[int, ...] = (128,)
        output_dim: int = 64

        def __post_init__(self) -> None:
            self.sparse = tuple(s if isinstance(s, SparseFeature) else SparseFeature(**s) for s in self.sparse)
            self.hidden_dims = tuple(self.hidden_dims)
            if not self.sparse and self.dense_dim < 1:
                raise InvalidInputError("a tower needs at least one sparse feature or dense_dim ≥ 1")
            if self.output_dim < 1 or self.dense_dim < 0 or any(h < 1 for h in self.hidden_dims):
                raise InvalidInputError(f"tower dimensions must be positive, got {self}")
            names = [s.name for s in self.sparse]
            if len(set(names)) != len(names):
                raise InvalidInputError(f"sparse feature names repeat: {names}")

        def to_dict(self) -> dict:
            return asdict(self)

    def __init__(self, config: Tower.Config) -> None:
        super().__init__()
        from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType

        self.config = config
        self.keys = [s.name for s in config.sparse]
        self.ebc = (
            EmbeddingBagCollection(
                tables=[
                    EmbeddingBagConfig(
                        name=f"t_{s.name}",
                        embedding_dim=s.dim,
                        num_embeddings=s.num_embeddings,
                        feature_names=[s.name],
                        pooling=PoolingType.MEAN,
                    )
                    for s in config.sparse
                ],
                device=torch.device("cpu"),
            )
            if config.sparse
            else None
        )
        dims = (sum(s.dim for s in config.sparse) + config.dense_dim, *config.hidden_dims)
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(dims[-1], config.output_dim))
        self.mlp = nn.Sequential(*layers)

    def pooled(self, kjt) -> torch.Tensor:
        """[B, Σ dim] mean-pooled embeddings, keys in config order."""
        if list(kjt.keys()) != self.keys:
            raise InvalidInputError(f"sparse features {list(kjt.keys())} do not match the tower's {self.keys}")
        return self.ebc(kjt).values()

    def forward(self, kjt=None, dense: torch.Tensor | None = None) -> torch.Tensor:
        parts = []
        if self.ebc is not None:
            if kjt is None:
                raise InvalidInputError(f"this tower needs sparse features {self.keys}")
            parts.append(self.pooled(kjt))
        if self.config.dense_dim:
            if dense is None or dense.ndim != 2 or dense.shape[1] != self.config.dense_dim:
                raise InvalidInputError(
                    f"dense features of shape {None if dense is None else tuple(dense.shape)}; "
                    f"the tower expects [B, {self.config.dense_dim}]"
                )
            parts.append(dense.to(torch.float32))
        return F.normalize(self.mlp(torch.cat(parts, dim=1)), dim=1)
