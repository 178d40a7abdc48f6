from model.tokenizer import IncrementalDecoder


def test_round_trip(tokenizer):
    for text in ["Hello world!", "  indented\n\tcode()", "héllo wörld 日本語 🙂", ""]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text


def test_chat_template_renders_chatml(tokenizer):
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi there"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nHi there<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2


def test_incremental_decoding_never_splits_characters(tokenizer):
    text = "Emoji 🙂 and 日本語, then ascii."
    ids = tokenizer.encode(text, add_special_tokens=False)
    # Multi-byte characters are split over several byte-level tokens.
    assert len(ids) > len(text.split())
    decoder = IncrementalDecoder(tokenizer)
    deltas = [decoder.step(i) for i in ids]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_incremental_decoding_skips_special_tokens(tokenizer):
    decoder = IncrementalDecoder(tokenizer)
    ids = tokenizer.encode("Paris.", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert "".join(decoder.step(i) for i in ids) == "Paris."
