"""HTTP routers, one per concern: /v1/generate, the OpenAI-compatible API, health/metrics/playground."""
