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
    # the learned model's fields took the numbers reserved for them (12-15): old clients stay compatible
    assert {n: req.fields_by_name[n].number for n in ("k0", "value_formula", "sparse_features", "user_ids")} == {
        "k0": 12, "value_formula": 13, "sparse_features": 14, "user_ids": 15}
