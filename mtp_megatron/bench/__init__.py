"""Benchmarks: training throughput (megatron against the local backend), memory, decoding
(ours against transformers' generate on the same weights), the GPU check."""
