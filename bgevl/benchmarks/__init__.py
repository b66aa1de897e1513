"""Latency/throughput benchmark suite (issue 5; not built yet)."""
