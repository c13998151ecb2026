"""Benchmarks: training throughput (megatron against the local backend), memory, the GPU check."""
