"""The committed gRPC modules are exactly what protoc generates from the .proto."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("grpc_tools")


def test_committed_generated_code_is_current(tmp_path):
    from sterling.cluster import protogen

    committed = Path(protogen.__file__).resolve().parent
    for path in protogen.generate(tmp_path):
        assert path.read_text() == (committed / path.name).read_text(), (
            f"{path.name} is stale: run `python -m sterling.cluster.protogen` and commit the result"
        )


def test_protocol_declares_the_issue_surface():
    from sterling.cluster import retrieval_pb2 as pb

    svc = pb.DESCRIPTOR.services_by_name["Retrieval"]
    assert svc.full_name == "sterling.v1.Retrieval"
    assert {m.name for m in svc.methods} == {"Retrieve", "Upsert", "Delete", "UpdateAttributes", "Info"}
    assert svc.methods_by_name["Upsert"].client_streaming
    req = pb.RetrieveRequest.DESCRIPTOR
    assert {"query_embedding", "user_features", "filter", "k", "nprobe", "deadline_ms", "require_complete"} <= set(
        req.fields_by_name
    )
    resp = pb.RetrieveResponse.DESCRIPTOR
    assert {"results", "model_version", "partial", "missing_shards", "version_skew", "timing"} <= set(
        resp.fields_by_name
    )
    # K0 and the value formula are reserved for the OverArch issue
    assert "k0" not in req.fields_by_name and "value_formula" not in req.fields_by_name
