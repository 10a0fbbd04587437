"""The aiohttp surface: OpenAI-compatible routes, probes, metrics."""
