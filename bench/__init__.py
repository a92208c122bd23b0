"""gyoza benchmarks (`make bench`)."""
