"""Peer servers that the suite measures attnrec against (same model, same client, same run)."""
