"""Fidelity: for a CPU deployment, the planner's predicted host bytes of a loaded
shard are within 10% of the RSS delta measured when loading it.

The index is assembled with the model API (``ItemIndex.from_parts`` + ``save``)
from tensors with the ItemIndex buffer layout; the full ``build_index`` (k-means,
assignment) would take minutes at 1M items on two cores and does not change
what is loaded. The prediction comes from the planner's *config* inventory
(not from the artifact header), so the test checks the inventory formulas.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from sterling.planner import IndexModelConfig, make_topology, plan

artifact = pytest.importorskip(
    "sterling.model.artifact", reason="sterling.model.artifact (index artifact format) not built yet"
)
torch = pytest.importorskip("torch")

DIM = 64
ATTRS = 6  # exactly ATTRS attributes per item, so the config can state it
FPR = 1e-3

_MEASURE = r"""
import gc, json, os, sys
import torch
from sterling.model import ItemIndex

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

gc.collect()
before = rss()
index = ItemIndex.load(sys.argv[1], verify=False)
total = 0
for name, buf in index.named_buffers():
    flat = buf.reshape(-1).view(torch.uint8) if buf.numel() else buf
    if flat.numel():
        total += int(flat[:: 4096].sum())  # touch every page (4 KiB)
        total += int(flat[-1])
after = rss()
print(json.dumps({"before": before, "after": after, "touched": total}))
"""


def _write_index(path, n: int, nlist: int) -> None:
    from sterling.model import IndexConfig, ItemIndex
    from sterling.model.bloom import size_bloom

    g = torch.Generator().manual_seed(0)
    spec = size_bloom(ATTRS, FPR)
    sizes = torch.full((nlist,), n // nlist, dtype=torch.int64)
    sizes[: n % nlist] += 1
    offsets = torch.zeros(nlist + 1, dtype=torch.int64)
    torch.cumsum(sizes, 0, out=offsets[1:])
    vocab = [f"f{j}:v{v}" for j in range(ATTRS) for v in range(10)]
    attr_ids = (torch.randint(0, 10, (n, ATTRS), generator=g, dtype=torch.int32)
                + torch.arange(ATTRS, dtype=torch.int32) * 10).reshape(-1)
    tensors = {
        "centroids": torch.nn.functional.normalize(torch.randn(nlist, DIM, generator=g), dim=1),
        "list_offsets": offsets,
        "codes": torch.randint(-127, 128, (n, DIM), generator=g, dtype=torch.int8),
        "scales": torch.rand(n, generator=g),
        "item_ids": torch.arange(n, dtype=torch.int64),
        "bloom": torch.randint(-(2**62), 2**62, (n, spec.words), generator=g, dtype=torch.int64),
        "attr_ids": attr_ids,
        "attr_offsets": torch.arange(0, (n + 1) * ATTRS, ATTRS, dtype=torch.int64),
        "alive": torch.full(((n + 7) // 8,), 255, dtype=torch.uint8),
        "version": torch.tensor(1, dtype=torch.int64),
    }
    meta = {"config": IndexConfig(nlist=nlist).to_dict(), "vocab": vocab,
            "bloom": {"words": spec.words, "hashes": spec.hashes}}
    ItemIndex.from_parts(meta, tensors).save(path)


@pytest.mark.parametrize(
    "n", [1_000_000, pytest.param(5_000_000, marks=pytest.mark.slow)], ids=["1M", "5M"]
)
def test_predicted_host_bytes_match_measured_rss(tmp_path, n):
    nlist = round(4 * math.sqrt(n))
    path = tmp_path / "index.st"
    _write_index(path, n, nlist)
    cfg = IndexModelConfig(
        items=n, dim=DIM, nlist=nlist, attrs_per_item=ATTRS, bloom_fpr=FPR,
        cache_dim=0, tower_params=0,
    )
    p = plan(cfg, make_topology("cpu"))
    assert p.num_shards == 1
    predicted = p.devices[0].storage.dram
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path)], capture_output=True, text=True, check=True,
    )
    m = json.loads(out.stdout.strip().splitlines()[-1])
    measured = m["after"] - m["before"]
    print(f"\n{n:,} items: predicted {predicted:,} B, measured RSS delta {measured:,} B "
          f"({(predicted - measured) / measured:+.2%})")
    assert measured > 0
    assert abs(predicted - measured) / measured < 0.10, (predicted, measured)
