"""The converted SmolLM2-135M-Instruct against transformers, from our directory and from the GGUF itself."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from model.bundled import bundled_gguf_path
from model.checkpoint import load_model
from model.generate import generate_tokens

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def ours(bundled_checkpoint):
    return load_model(bundled_checkpoint, dtype=torch.float32)


@pytest.fixture(scope="module")
def theirs(bundled_checkpoint):
    return AutoModelForCausalLM.from_pretrained(bundled_checkpoint, dtype=torch.float32).eval()


def _hf_greedy(model, ids, n):
    """transformers' greedy continuation, ending at <|im_end|> (id 2) like ours with stop_ids=(2,)."""
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=2, eos_token_id=2)
    return out[0, len(ids) :].tolist()


def test_logits_match(ours, theirs, tokenizer):
    for prompt in PROMPTS:
        idx = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
        with torch.no_grad():
            diff = (ours(idx) - theirs(idx).logits).abs().max().item()
        assert diff <= 1e-3, prompt


@pytest.mark.long
def test_greedy_continuations_match(ours, theirs, tokenizer):
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        mine = list(generate_tokens(ours, ids, 32, stop_ids=(2,)))
        assert mine == _hf_greedy(theirs, ids, 32), prompt


@pytest.mark.long
def test_transformers_loading_the_gguf_agrees(ours, tokenizer):
    gguf = bundled_gguf_path()
    from_gguf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    idx = torch.tensor([tokenizer.encode(PROMPTS[0], add_special_tokens=False)])
    with torch.no_grad():
        assert (ours(idx) - from_gguf(idx).logits).abs().max().item() <= 1e-3
    ids = idx[0].tolist()
    assert list(generate_tokens(ours, ids, 32, stop_ids=(2,))) == _hf_greedy(from_gguf, ids, 32)


def test_instruct_model_answers(ours, tokenizer):
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    text = tokenizer.decode(list(generate_tokens(ours, ids, 20, stop_ids=(2,))), skip_special_tokens=True)
    assert "Paris" in text
