"""A vLLM simulator (fake backend) for the demo, the benchmarks and the tests."""
