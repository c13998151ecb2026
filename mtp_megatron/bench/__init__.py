"""Benchmarks: training throughput of our models against a plain-PyTorch baseline."""
