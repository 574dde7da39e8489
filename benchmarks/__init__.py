"""attnrec's benchmark suite (latency and throughput of every stage; see the README)."""
