"""The SmolLM2 architecture in plain PyTorch, with Hugging Face checkpoint interchange."""

from model.config import ModelConfig
from model.llama import Transformer

__all__ = ["ModelConfig", "Transformer"]
