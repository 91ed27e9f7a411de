"""pytest-benchmark suite (`make bench`). Each file benchmarks one part against its baseline in the same run."""
