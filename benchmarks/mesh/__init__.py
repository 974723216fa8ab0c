"""The microservice mesh ``sterling bench e2e`` measures Sterling against (docs/mesh.md).

An orchestrator gRPC service calls a user-tower service, a filter service
(pyroaring inverted index), an ANN service (Faiss IVF-SQ8 over the Sterling
index's own item vectors, lists and nprobe) and a scoring service (the same
OverArch, task heads and Value Model), each its own OS process, protobuf over
loopback. ``Mesh`` starts and stops the five processes.
"""
