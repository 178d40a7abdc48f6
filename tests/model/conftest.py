from pathlib import Path

import pytest
import torch

from model.bundled import default_checkpoint
from model.checkpoint import save_checkpoint
from model.config import ModelConfig
from model.llama import Transformer
from model.tokenizer import load_tokenizer


@pytest.fixture(scope="session")
def bundled_checkpoint() -> Path:
    """The embedded SmolLM2-135M-Instruct as a Hugging Face directory (converted once per cache)."""
    return default_checkpoint()


@pytest.fixture(scope="session")
def tokenizer(bundled_checkpoint):
    return load_tokenizer(bundled_checkpoint)


@pytest.fixture(scope="session")
def tiny_model() -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny"))
    model.init_weights(seed=0)
    # Perturb the norms so a wrong norm mapping cannot hide behind all-ones weights.
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_model, tokenizer) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", tiny_model, tokenizer=tokenizer)
