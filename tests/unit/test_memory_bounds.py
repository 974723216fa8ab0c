"""Bounded memory: each input class, driven under an address-space cap, gets its typed error — not a kill.

Each case runs in a fresh Python process that builds a small model, then caps
its own address space (``resource.setrlimit(RLIMIT_AS)``) at what it already
maps plus ``HEADROOM_MB``, and only then sends the oversized input. Before
the limits existed these inputs asked for gigabytes (k = 10^9 → 24 GB; one
item with 10,000 attributes → 16 GB in the false-positive measurement); a
``MemoryError`` or a signal would fail the test.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

HEADROOM_MB = 768

_PRELUDE = """
import resource, sys
import numpy as np, torch
torch.set_num_threads(1)
from sterling.model import IndexConfig, RetrievalModel, build_index
from sterling.model import bloom
x = torch.randn(4000, 16, generator=torch.Generator().manual_seed(0))
attrs = [["lang:en", f"country:c{i % 7}"] for i in range(4000)]
index = build_index(x, attributes=attrs, config=IndexConfig(nlist=16))
model = RetrievalModel(index)
model(query=x[:2], k=5, where="lang:en")  # warm every lazy path before the cap

def vm_bytes():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmSize:")) * 1024

cap = vm_bytes() + {headroom} * 2**20
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
try:
{body}
    print("RESULT none")
except MemoryError:
    print("RESULT MemoryError")
except Exception as e:
    print("RESULT", type(e).__name__)
"""

CASES = {
    "k of a billion (Python API)": ("LimitExceededError", "model(query=x[:4], k=1_000_000_000)"),
    "k of a billion on a batch of 256": ("LimitExceededError", "index.search(x[:256], k=10**9, nprobe=16)"),
    "an item with 10,000 attributes": (
        "TooManyAttributesError",
        "build_index(x[:64], attributes=[['a:b']] * 63 + [[f't:{i}' for i in range(10_000)]],"
        " config=IndexConfig(nlist=2))",
    ),
    "10,000 attributes allowed: the FPR measurement stays bounded": (
        "none",
        "ix = build_index(x[:64], attributes=[['a:b']] * 63 + [[f't:{i}' for i in range(10_000)]],"
        " config=IndexConfig(nlist=2, max_attributes_per_item=10_000))\n"
        "assert 0 <= bloom.measure_fpr(ix) < 1",
    ),
    "a filter of 100,000 terms": (
        "FilterTooLargeError", "model(query=x[:1], k=5, where=' OR '.join(f'a:{i}' for i in range(100_000)))"
    ),
    "a batch of 4096 queries × k at the limit through the router": (
        "RequestTooLargeError",
        "from sterling.cluster.embedded import local_router\n"
        "from sterling.cluster.router import RouterConfig\n"
        "r = local_router(model, config=RouterConfig(max_k=10_000, max_results=1_000_000))\n"
        "r.retrieve(query=np.ones((4096, 16), np.float32), k=10_000)",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_oversized_input_under_a_memory_cap_gets_its_typed_error(case):
    want, body = CASES[case]
    code = _PRELUDE.replace("{headroom}", str(HEADROOM_MB)).replace("{body}", textwrap.indent(body, "    "))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={"TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                            "TRITON_INTERPRET": "1"})
    assert p.returncode == 0, f"killed or crashed (rc {p.returncode}):\n{p.stderr[-3000:]}"
    got = [line.split()[1] for line in p.stdout.splitlines() if line.startswith("RESULT")]
    assert got == [want], (p.stdout[-2000:], p.stderr[-2000:])
