"""The mesh's committed gRPC modules are exactly what protoc generates from benchmarks/mesh/proto/mesh.proto."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("grpc_tools")


def test_committed_mesh_generated_code_is_current(tmp_path):
    from sterling.benchmarks.mesh import protogen

    committed = Path(protogen.__file__).resolve().parent
    for path in protogen.generate(tmp_path):
        assert path.read_text() == (committed / path.name).read_text(), (
            f"{path.name} is stale: run `python -m sterling.benchmarks.mesh.protogen` and commit the result"
        )


def test_mesh_protocol_has_one_service_per_process():
    from sterling.benchmarks.mesh import mesh_pb2 as pb

    assert set(pb.DESCRIPTOR.services_by_name) == {"UserTower", "Filter", "Ann", "Scoring", "Orchestrator"}
