"""Generated gRPC stubs (from ../../proto by `python -m attnrec.engine.rpc.regenerate`; do not edit)."""
