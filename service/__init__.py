"""The smollm inference server: FastAPI routes over a continuous-batching engine on the `model` package."""
