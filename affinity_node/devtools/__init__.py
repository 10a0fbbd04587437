"""Developer tools that ship with the source, not the wheel: benchmarks and the dashboard
generator. The node never imports them (import-linter checks)."""
