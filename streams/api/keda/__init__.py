"""KEDA's External Scaler gRPC protocol: ``externalscaler.proto`` vendored from the KEDA
repository (see NOTICE) and the Python code ``grpc_tools.protoc`` generates from it.

Regenerate from the repository root (``tests/test_keda_scaler.py`` checks that this gives
the committed files byte for byte, so they cannot drift from the proto)::

    python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. \\
        streams/api/keda/externalscaler.proto
"""
