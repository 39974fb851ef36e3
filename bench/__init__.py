"""Benchmark suite of aunn_fast (see README.md); the command line is aunn_fast.bench.run.main."""
