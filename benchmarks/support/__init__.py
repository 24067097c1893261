"""Support code shared by the benchmarks and the tests that run them (never imported by
production code): child processes, reading topics back, synthetic records."""
