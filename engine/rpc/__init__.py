"""Generated gRPC stubs (from ../../proto by `python -m engine.rpc.regenerate`; do not edit)."""
