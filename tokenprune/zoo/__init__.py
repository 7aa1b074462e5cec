"""Model builders: tiny random models of every supported family (tests, benchmarks)."""
