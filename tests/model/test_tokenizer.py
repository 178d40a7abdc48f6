import json
import shutil

from model.tokenizer import IncrementalDecoder, load_tokenizer


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


def test_a_generic_tokenizer_loads_as_autotokenizer_would(bundled_checkpoint, tokenizer, tmp_path):
    # The direct load (no model configuration resolved) must give what AutoTokenizer gives for the same files.
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(str(bundled_checkpoint))
    assert type(tokenizer) is type(auto)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == auto.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True
    )
    for text in ["Hello world", "<|im_start|>user\nHi<|im_end|>", "héllo 🙂"]:
        assert tokenizer(text)["input_ids"] == auto(text)["input_ids"]
    assert tokenizer.special_tokens_map == auto.special_tokens_map and tokenizer.all_special_ids == auto.all_special_ids
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        auto.bos_token_id,
        auto.eos_token_id,
        auto.pad_token_id,
    )

    # A checkpoint naming another class is left to AutoTokenizer, which builds that class.
    other = tmp_path / "other"
    other.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(bundled_checkpoint / name, other / name)
    config = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "GPT2Tokenizer"}))
    assert type(load_tokenizer(other)).__name__ == type(AutoTokenizer.from_pretrained(str(other))).__name__
    assert type(load_tokenizer(other)).__name__ != type(tokenizer).__name__
