"""Hardware presets and the constants they are built from.

Units: bytes, bytes/s, ops/s. Sizes are decimal (1 GB = 1e9 bytes), as in
NVIDIA's datasheets. Every number says where it comes from; "assumption"
marks a modelling choice that no datasheet gives.
"""

from __future__ import annotations

from sterling.planner import errors
from sterling.planner.types import DeviceKind, DeviceSpec, Topology

__all__ = [
    "GB",
    "DEVICE_PRESETS",
    "HOST_PRESETS",
    "HostSpec",
    "get_device",
    "make_topology",
]

GB: int = 10**9
TB: int = 10**12

# Fraction of device memory the planner fills; the rest is CUDA context,
# allocator fragmentation and per-batch scratch. Assumption (TorchRec's
# planner reserves a similar share via HeuristicalStorageReservation).
HBM_USABLE_FRACTION: float = 0.9
# Share of L2 that can be set aside as a persisting window: 30 MB of 40 MB on
# A100 (CUDA C++ Programming Guide, "L2 cache set-aside"); the same ratio is
# assumed for the other parts.
L2_PERSISTING_FRACTION: float = 0.75
# L2 read bandwidth relative to HBM. Assumption: ~3x, in line with published
# microbenchmarks of A100/H100 L2; used only to rank SRAM above HBM.
SRAM_BW_OVER_HBM: float = 3.0

# --- NVIDIA H100 SXM5 80GB, "NVIDIA H100 Tensor Core GPU" datasheet ---
H100_HBM: int = 80 * GB  # bytes, HBM3
H100_HBM_BW: float = 3.35e12  # bytes/s
H100_L2: int = 50 * 10**6  # bytes
H100_INT8_OPS: float = 1979e12  # ops/s dense (3958 with sparsity)
H100_FP16_FLOPS: float = 989.4e12  # FLOP/s dense tensor core
H100_FP32_FLOPS: float = 67e12  # FLOP/s
H100_PCIE_BW: float = 64e9  # bytes/s per direction, PCIe Gen5 x16 (128 GB/s both ways)
H100_NVLINK_BW: float = 900e9  # bytes/s per GPU, NVLink 4

# --- NVIDIA H200 SXM 141GB, "NVIDIA H200 Tensor Core GPU" datasheet (compute = H100 SXM) ---
H200_HBM: int = 141 * GB  # bytes, HBM3e
H200_HBM_BW: float = 4.8e12  # bytes/s

# --- NVIDIA A100 SXM4, "NVIDIA A100 Tensor Core GPU" datasheet ---
A100_40_HBM: int = 40 * GB  # bytes, HBM2
A100_40_HBM_BW: float = 1.555e12  # bytes/s
A100_80_HBM: int = 80 * GB  # bytes, HBM2e
A100_80_HBM_BW: float = 2.039e12  # bytes/s
A100_L2: int = 40 * 10**6  # bytes
A100_INT8_OPS: float = 624e12  # ops/s dense
A100_FP16_FLOPS: float = 312e12  # FLOP/s dense tensor core
A100_FP32_FLOPS: float = 19.5e12  # FLOP/s
A100_PCIE_BW: float = 32e9  # bytes/s per direction, PCIe Gen4 x16
A100_NVLINK_BW: float = 600e9  # bytes/s per GPU, NVLink 3

# --- NVIDIA L4 24GB, "NVIDIA L4 Tensor Core GPU" datasheet (sparse figures halved) ---
L4_MEM: int = 24 * GB  # bytes, GDDR6
L4_MEM_BW: float = 300e9  # bytes/s
L4_L2: int = 48 * 10**6  # bytes
L4_INT8_OPS: float = 242.5e12  # ops/s dense (485 with sparsity)
L4_FP16_FLOPS: float = 121e12  # FLOP/s dense (242 with sparsity)
L4_FP32_FLOPS: float = 30.3e12  # FLOP/s
L4_PCIE_BW: float = 32e9  # bytes/s per direction, PCIe Gen4 x16

# --- CPU-only host: measured on the 2-core AVX2 dev box (docs/install.md) ---
CPU_DRAM_BW: float = 22e9  # bytes/s, measured read bandwidth, 2 threads
CPU_INT8_OPS: float = 41e9  # ops/s, measured fbgemm int8 GEMM, 2 threads
CPU_FP32_FLOPS: float = 24e9  # FLOP/s, measured sgemm, 2 threads


def _gpu(
    name: str,
    *,
    hbm: int,
    hbm_bw: float,
    l2: int,
    int8: float,
    fp16: float,
    fp32: float,
    link: float,
    source: str,
) -> DeviceSpec:
    return DeviceSpec(
        name=name,
        kind=DeviceKind.GPU,
        hbm_bytes=hbm,
        sram_bytes=int(l2 * L2_PERSISTING_FRACTION),
        hbm_bw=hbm_bw,
        sram_bw=hbm_bw * SRAM_BW_OVER_HBM,
        host_link_bw=link,
        int8_ops=int8,
        fp16_flops=fp16,
        fp32_flops=fp32,
        usable_fraction=HBM_USABLE_FRACTION,
        source=source,
    )


DEVICE_PRESETS: dict[str, DeviceSpec] = {
    "h100-80g": _gpu(
        "h100-80g", hbm=H100_HBM, hbm_bw=H100_HBM_BW, l2=H100_L2, int8=H100_INT8_OPS,
        fp16=H100_FP16_FLOPS, fp32=H100_FP32_FLOPS, link=H100_PCIE_BW,
        source="NVIDIA H100 SXM5 datasheet",
    ),
    "h200-141g": _gpu(
        "h200-141g", hbm=H200_HBM, hbm_bw=H200_HBM_BW, l2=H100_L2, int8=H100_INT8_OPS,
        fp16=H100_FP16_FLOPS, fp32=H100_FP32_FLOPS, link=H100_PCIE_BW,
        source="NVIDIA H200 SXM datasheet",
    ),
    "a100-40g": _gpu(
        "a100-40g", hbm=A100_40_HBM, hbm_bw=A100_40_HBM_BW, l2=A100_L2, int8=A100_INT8_OPS,
        fp16=A100_FP16_FLOPS, fp32=A100_FP32_FLOPS, link=A100_PCIE_BW,
        source="NVIDIA A100 SXM4 40GB datasheet",
    ),
    "a100-80g": _gpu(
        "a100-80g", hbm=A100_80_HBM, hbm_bw=A100_80_HBM_BW, l2=A100_L2, int8=A100_INT8_OPS,
        fp16=A100_FP16_FLOPS, fp32=A100_FP32_FLOPS, link=A100_PCIE_BW,
        source="NVIDIA A100 SXM4 80GB datasheet",
    ),
    "l4-24g": _gpu(
        "l4-24g", hbm=L4_MEM, hbm_bw=L4_MEM_BW, l2=L4_L2, int8=L4_INT8_OPS,
        fp16=L4_FP16_FLOPS, fp32=L4_FP32_FLOPS, link=L4_PCIE_BW,
        source="NVIDIA L4 datasheet",
    ),
    "cpu": DeviceSpec(
        name="cpu",
        kind=DeviceKind.CPU,
        hbm_bytes=0,
        sram_bytes=0,
        hbm_bw=0.0,
        sram_bw=0.0,
        host_link_bw=CPU_DRAM_BW,
        int8_ops=CPU_INT8_OPS,
        fp16_flops=CPU_FP32_FLOPS,
        fp32_flops=CPU_FP32_FLOPS,
        usable_fraction=1.0,
        source="measured on a 2-core AVX2 host (docs/install.md)",
    ),
}


class HostSpec:
    """The host a preset GPU usually sits in: DRAM, memory and network bandwidth."""

    __slots__ = ("dram", "dram_bw", "intra_bw", "inter_bw", "default_gpus", "source")

    def __init__(
        self, *, dram: int, dram_bw: float, intra_bw: float, inter_bw: float,
        default_gpus: int, source: str,
    ) -> None:
        self.dram = dram  # bytes per host
        self.dram_bw = dram_bw  # bytes/s per host
        self.intra_bw = intra_bw  # bytes/s per GPU to its peers
        self.inter_bw = inter_bw  # bytes/s per host to other hosts
        self.default_gpus = default_gpus
        self.source = source


# DGX H100/H200: 2 TB DDR5; 2 sockets x 8 channels DDR5-4800 (~307 GB/s each);
# 8 x ConnectX-7 400 Gb/s = 400 GB/s per host (NVIDIA DGX H100 user guide).
_DGX_H = HostSpec(dram=2 * TB, dram_bw=614e9, intra_bw=H100_NVLINK_BW, inter_bw=400e9,
                  default_gpus=8, source="NVIDIA DGX H100/H200 user guide")
# DGX A100: 1 TB DDR4; 2 x EPYC 7742, 8 channels DDR4-3200 (~205 GB/s each);
# 8 x ConnectX-6 200 Gb/s = 200 GB/s per host (NVIDIA DGX A100 user guide).
_DGX_A = HostSpec(dram=1 * TB, dram_bw=410e9, intra_bw=A100_NVLINK_BW, inter_bw=200e9,
                  default_gpus=8, source="NVIDIA DGX A100 user guide")
# 8 x L4 host (GCP g2-standard-96: 384 GB RAM, 100 Gb/s network); GPUs talk over PCIe.
_L4_HOST = HostSpec(dram=384 * GB, dram_bw=300e9, intra_bw=L4_PCIE_BW, inter_bw=12.5e9,
                    default_gpus=8, source="GCP g2-standard-96 machine type")
# CPU server of the SilverTorch paper's baseline: 256 GB (AWS r6i.8xlarge, 12.5 Gb/s);
# memory bandwidth is the dev box's measured figure (a floor).
_CPU_HOST = HostSpec(dram=256 * GB, dram_bw=CPU_DRAM_BW, intra_bw=CPU_DRAM_BW,
                     inter_bw=1.5625e9, default_gpus=1,
                     source="SilverTorch paper CPU server / AWS r6i.8xlarge")

HOST_PRESETS: dict[str, HostSpec] = {
    "h100-80g": _DGX_H,
    "h200-141g": _DGX_H,
    "a100-40g": _DGX_A,
    "a100-80g": _DGX_A,
    "l4-24g": _L4_HOST,
    "cpu": _CPU_HOST,
}


def get_device(name: str) -> DeviceSpec:
    key = name.strip().lower()
    if key not in DEVICE_PRESETS:
        raise errors.InvalidPlanConfigError(
            f"unknown device {name!r}; known presets: {', '.join(sorted(DEVICE_PRESETS))}"
        )
    return DEVICE_PRESETS[key]


def make_topology(
    device: str | DeviceSpec,
    *,
    hosts: int = 1,
    gpus_per_host: int | None = None,
    host_dram_bytes: int | None = None,
) -> Topology:
    """A topology of identical hosts built from a preset (host defaults per device)."""
    spec = get_device(device) if isinstance(device, str) else device
    host = HOST_PRESETS.get(spec.name, _DGX_H if spec.kind is DeviceKind.GPU else _CPU_HOST)
    g = host.default_gpus if gpus_per_host is None else gpus_per_host
    if g < 1:
        raise errors.InvalidPlanConfigError(f"gpus_per_host ({g}) must be >= 1")
    return Topology(
        device=spec,
        hosts=hosts,
        gpus_per_host=g,
        host_dram_bytes=host.dram if host_dram_bytes is None else host_dram_bytes,
        host_dram_bw=host.dram_bw,
        intra_host_bw=host.intra_bw,
        inter_host_bw=host.inter_bw,
        remote_bw=host.inter_bw / g,
    )
