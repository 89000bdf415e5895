"""Latency, throughput and quality benchmarks (JSON results and PNG plots)."""
