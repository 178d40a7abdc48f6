"""What the server does to a checkpoint when it loads it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model.packed_linear import PackedLinear
from service.loading import make_loader
from tests.service.conftest import tiny_settings


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
def test_linear_weights_are_packed_unless_disabled(tiny_checkpoint):
    model, tokenizer = make_loader(tiny_settings(tiny_checkpoint))(tiny_checkpoint)
    assert isinstance(model.output, PackedLinear)
    assert isinstance(model.layers[0].attention.wqkv, PackedLinear)
    assert tokenizer is not None

    model, _ = make_loader(tiny_settings(tiny_checkpoint, pack_weights=False))(tiny_checkpoint)
    assert type(model.output) is nn.Linear
