"""Benchmarks: serving and training speed next to transformers and llama.cpp (`python -m bench`)."""
