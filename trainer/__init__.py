"""The smollm trainer: a batch job that trains a SmolLM2-style model and writes crash-safe checkpoints."""
