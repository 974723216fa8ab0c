"""The single-file artifact: tensors + JSON metadata, atomic and checksummed.

Layout::

    magic      8 bytes   b"STERLNG\\0"
    version    u32 LE    FORMAT_VERSION
    hdr_len    u64 LE
    hdr_crc    u32 LE    crc32 of the header bytes
    header     JSON      {format_version, kind, meta, tensors: [{name, dtype,
                          shape, offset, nbytes}], data_len, data_crc}
    padding    to a 64-byte boundary
    data       every tensor 64-byte aligned; data_crc covers all of it,
               padding included, so any flipped byte is detected

Writes go to a temp file in the same directory, are fsynced, then renamed
over the target: a failed or interrupted save leaves no partial artifact.
Reads memory-map the data (copy-on-write, so in-place updates never touch
the file) after verifying sizes and checksums.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import tempfile
import zlib
from pathlib import Path

import torch

from sterling.model.errors import (
    ArtifactError,
    CorruptArtifactError,
    ForeignArtifactError,
    UnsupportedVersionError,
)

__all__ = ["FORMAT_VERSION", "write_artifact", "read_header", "read_artifact"]

MAGIC = b"STERLNG\0"
FORMAT_VERSION = 1
_PRE = struct.Struct("<8sIQI")  # magic, version, header length, header crc
_ALIGN = 64
_CHUNK = 1 << 24

_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.float64,
        torch.int8,
        torch.uint8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.bool,
    )
}


def _pad(n: int) -> int:
    return (-n) % _ALIGN


def write_artifact(path: str | Path, *, kind: str, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    path = Path(path)
    entries, blobs, off = [], [], 0
    for name, t in tensors.items():
        t = t.detach().contiguous().cpu()
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise ArtifactError(f"tensor {name!r} has dtype {t.dtype}, which artifacts cannot store")
        nbytes = t.numel() * t.element_size()
        entries.append({"name": name, "dtype": dtype, "shape": list(t.shape), "offset": off, "nbytes": nbytes})
        blobs.append((t, nbytes))
        off += nbytes + _pad(nbytes)
    data_len = off

    # data checksum first (streamed), so the header can carry it
    crc = 0
    for t, nbytes in blobs:
        if nbytes:
            crc = zlib.crc32(_bytes_view(t), crc)
        crc = zlib.crc32(b"\0" * _pad(nbytes), crc)
    header = json.dumps(
        {
            "format_version": FORMAT_VERSION,
            "kind": kind,
            "meta": meta,
            "tensors": entries,
            "data_len": data_len,
            "data_crc": crc,
        },
        separators=(",", ":"),
    ).encode()
    pre = _PRE.pack(MAGIC, FORMAT_VERSION, len(header), zlib.crc32(header))
    head_pad = _pad(len(pre) + len(header))

    if path.is_dir():
        raise ArtifactError(f"{path} is a directory; give a file path for the artifact, e.g. {path / 'model.st'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise ArtifactError(f"cannot create the directory of {path}: a file is in the way ({e})") from e
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".tmp-", dir=path.parent)
    try:
        os.fchmod(fd, _umask_mode())  # mkstemp makes 0600; artifacts get the process umask like open() would
        with os.fdopen(fd, "wb") as f:
            f.write(pre)
            f.write(header)
            f.write(b"\0" * head_pad)
            for t, nbytes in blobs:
                if nbytes:
                    f.write(_bytes_view(t))
                f.write(b"\0" * _pad(nbytes))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _umask_mode() -> int:
    """0o666 minus the process umask: read from /proc (never changed), else by the set-and-restore idiom."""
    try:
        with open("/proc/self/status") as f:
            mask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def _open_for_read(path: Path):
    if path.is_dir():
        raise ArtifactError(f"{path} is a directory, not an artifact; give the .st file written by `sterling build`")
    try:
        return open(path, "rb")
    except FileNotFoundError as e:
        raise ArtifactError(f"artifact {path} does not exist") from e
    except PermissionError as e:
        raise ArtifactError(f"artifact {path} is not readable by this user ({e})") from e


def _bytes_view(t: torch.Tensor) -> memoryview:
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _read_pre(f, path: Path) -> tuple[dict, int]:
    pre = f.read(_PRE.size)
    if len(pre) < _PRE.size or pre[:8] != MAGIC:
        raise ForeignArtifactError(
            f"{path} is not a Sterling artifact (bad magic bytes); expected a file written by "
            "`sterling build` or Model.save()"
        )
    _, version, hdr_len, hdr_crc = _PRE.unpack(pre)
    if version > FORMAT_VERSION:
        raise UnsupportedVersionError(
            f"{path} has artifact format {version}; this Sterling reads up to {FORMAT_VERSION}. "
            "Upgrade Sterling, or rebuild the artifact with this version"
        )
    size = os.fstat(f.fileno()).st_size
    if hdr_len > size:
        raise CorruptArtifactError(f"{path}: header length {hdr_len} exceeds the file size {size}")
    header = f.read(hdr_len)
    if len(header) != hdr_len or zlib.crc32(header) != hdr_crc:
        raise CorruptArtifactError(f"{path}: header checksum mismatch; the file is damaged, rebuild or re-copy it")
    try:
        h = json.loads(header)
    except ValueError as e:
        raise CorruptArtifactError(f"{path}: header is not valid JSON") from e
    data_start = _PRE.size + hdr_len + _pad(_PRE.size + hdr_len)
    if size != data_start + h["data_len"]:
        raise CorruptArtifactError(
            f"{path}: file is {size} bytes but the header describes {data_start + h['data_len']}; "
            "it was truncated or appended to"
        )
    return h, data_start


def read_header(path: str | Path) -> dict:
    """The artifact's header (kind, meta, tensor names/dtypes/shapes/nbytes) without its data."""
    path = Path(path)
    with _open_for_read(path) as f:
        h, _ = _read_pre(f, path)
    return h


def read_artifact(
    path: str | Path, *, verify: bool = True, mmap_data: bool = True
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Header and tensors. With ``mmap_data`` tensors are copy-on-write views of the file."""
    path = Path(path)
    f = _open_for_read(path)
    with f:
        h, data_start = _read_pre(f, path)
        if verify:
            f.seek(data_start)
            crc, left = 0, h["data_len"]
            while left:
                chunk = f.read(min(_CHUNK, left))
                if not chunk:
                    break
                crc = zlib.crc32(chunk, crc)
                left -= len(chunk)
            if crc != h["data_crc"]:
                raise CorruptArtifactError(
                    f"{path}: data checksum mismatch; the file is damaged, rebuild or re-copy it"
                )
        if mmap_data and h["data_len"]:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        else:
            f.seek(0)
            buf = bytearray(f.read())
    tensors = {}
    for e in h["tensors"]:
        dtype = _DTYPES[e["dtype"]]
        numel = 1
        for s in e["shape"]:
            numel *= s
        if numel == 0:
            tensors[e["name"]] = torch.empty(e["shape"], dtype=dtype)
            continue
        t = torch.frombuffer(buf, dtype=dtype, count=numel, offset=data_start + e["offset"])
        tensors[e["name"]] = t.reshape(e["shape"])
    return h, tensors
