"""Benchmark harness for jaxckpt (see benchmarks/README.md)."""
