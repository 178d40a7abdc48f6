import json

import jsonschema
import pytest
import torch

from model.bundled import default_checkpoint
from model.config import ModelConfig
from model.generate import decode_one_token, prefill
from model.llama import Transformer
from model.sampling import SamplingParams, sample
from service.structured_output import StructuredOutput, grammar_for, tokenizer_info

GREEDY = SamplingParams(temperature=0.0)
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "occupation": {"type": "string", "maxLength": 40},
    },
    "required": ["name", "age", "occupation"],
    "additionalProperties": False,
}
# Every value bounded, so even a random model must finish within a few dozen tokens.
SMALL = {
    "type": "object",
    "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 99},
        "b": {"type": "boolean"},
        "c": {"enum": ["x", "yz"]},
    },
    "required": ["a", "b", "c"],
    "additionalProperties": False,
}


def _schema_format(schema):
    return {"type": "json_schema", "json_schema": {"name": "t", "schema": schema}}


@torch.inference_mode()
def _constrained_greedy(model, tokenizer, prompt_ids, matcher, max_tokens):
    """Greedy tokens under `matcher`'s mask, and how many steps the mask overruled the model's own argmax."""
    eos = tokenizer.eos_token_id
    cache = model.new_kv_cache(max_slots=1, max_len=len(prompt_ids) + max_tokens)
    logits = prefill(model, cache, 0, prompt_ids)
    out, overruled = [], 0
    for position in range(len(prompt_ids), len(prompt_ids) + max_tokens):
        allowed = matcher.allowed_tokens()
        token = int(sample(logits, [GREEDY], [None], allowed=[allowed])[0])
        assert allowed[token]
        overruled += int(logits[0].argmax()) != token
        if token == eos:
            break
        assert matcher.accept(token), matcher.error
        out.append(token)
        if matcher.is_finished:
            break
        logits = decode_one_token(model, cache, 0, token, position)
    return out, overruled


@pytest.fixture(scope="module")
def tiny():
    model = Transformer(ModelConfig.from_name("tiny"))
    model.init_weights(seed=0)
    with torch.no_grad():  # sharper logits, so the model has strong (and wrong) opinions of its own
        for p in model.parameters():
            p.mul_(4.0) if p.dim() > 1 else p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    return model.eval()


def test_mask_keeps_a_random_model_on_the_schema(tiny, tokenizer):
    matcher = StructuredOutput.from_response_format(_schema_format(SMALL), tokenizer, tiny.config.vocab_size)
    prompt = tokenizer.encode("Some JSON please:")
    tokens, overruled = _constrained_greedy(tiny, tokenizer, prompt, matcher, max_tokens=60)
    text = tokenizer.decode(tokens)
    jsonschema.validate(json.loads(text), SMALL)
    assert matcher.is_complete
    assert overruled > len(tokens) // 2  # the mask, not the model, made it JSON


def test_first_step_allows_only_an_object_opening(tokenizer):
    matcher = StructuredOutput.from_response_format({"type": "json_object"}, tokenizer, 49152)
    allowed = matcher.allowed_tokens()
    assert allowed.shape == (49152,) and 0 < int(allowed.sum()) < 10
    assert all(tokenizer.decode([t]).startswith("{") for t in allowed.nonzero().flatten().tolist())
    for text in ("[", "}", "Sure", " {"):
        assert not allowed[tokenizer.encode(text)[0]], text
    assert not allowed[tokenizer.eos_token_id]


def test_allowed_tokens_reads_the_bitmask_bit_by_bit(tokenizer):
    matcher = StructuredOutput.from_response_format(_schema_format(SMALL), tokenizer, 49160)  # not a multiple of 32
    for t in tokenizer.encode('{"a":4'):
        matcher.accept(t)
    allowed = matcher.allowed_tokens()
    words = torch.zeros(1, (49160 + 31) // 32, dtype=torch.int32)
    matcher.fill_bitmask(words)
    want = [(int(words[0, t // 32]) >> (t % 32)) & 1 == 1 for t in range(49160)]
    assert allowed.dtype == torch.bool and allowed.tolist() == want
    assert 0 < sum(want) < 100  # a digit, or what may follow one


def test_fill_bitmask_refuses_a_tensor_it_cannot_write(tokenizer):
    matcher = StructuredOutput.from_response_format({"type": "json_object"}, tokenizer, 49152)
    words = (49152 + 31) // 32
    for bad in (
        torch.zeros(1, words, dtype=torch.int64),  # not int32
        torch.zeros(1, 2 * words, dtype=torch.int32)[:, ::2],  # a row that is not contiguous
        torch.zeros(1, words - 1, dtype=torch.int32),  # too narrow for the vocabulary
    ):
        with pytest.raises(ValueError):
            matcher.fill_bitmask(bad)
    rows = torch.zeros(3, words, dtype=torch.int32)
    matcher.fill_bitmask(rows, row=1)
    assert rows[0].eq(0).all() and rows[2].eq(0).all() and rows[1].ne(0).any()


def test_end_token_allowed_exactly_when_complete(tokenizer):
    matcher = StructuredOutput.from_response_format(_schema_format(SMALL), tokenizer)
    ids = tokenizer.encode('{"a":42,"b":true,"c":"yz"}')
    for t in ids[:-1]:
        assert not matcher.allowed_tokens()[tokenizer.eos_token_id]
        assert matcher.accept(t) and not matcher.is_complete
    assert matcher.accept(ids[-1])
    assert matcher.is_complete and matcher.is_finished
    allowed = matcher.allowed_tokens()
    assert allowed[tokenizer.eos_token_id] and int(allowed.sum()) == 1


def test_schema_rejects_wrong_values(tokenizer):
    matcher = StructuredOutput.from_response_format(_schema_format(SMALL), tokenizer)
    for t in tokenizer.encode('{"a":'):
        assert matcher.accept(t)
    allowed = matcher.allowed_tokens()
    assert not allowed[tokenizer.encode('"')[0]]  # a string where an integer must go
    assert not allowed[tokenizer.encode("-")[0]]  # minimum 0
    assert not matcher.accept(tokenizer.encode("true")[0])
    assert "doesn't satisfy the grammar" in matcher.error and matcher.is_finished


def test_copies_advance_independently(tokenizer):
    first = StructuredOutput.from_response_format(_schema_format(SMALL), tokenizer)
    for t in tokenizer.encode('{"a":1'):
        assert first.accept(t)
    second = first.copy()
    assert second.accept(tokenizer.encode(",")[0])
    assert not torch.equal(first.allowed_tokens(), second.allowed_tokens())
    assert first.accept(tokenizer.encode("2")[0]) and not second.accept(tokenizer.encode("2")[0])


def test_tokenizer_table_built_once(tokenizer):
    assert tokenizer_info(tokenizer, 49152) is tokenizer_info(tokenizer, 49152)


def test_text_or_absent_format_means_no_constraint(tokenizer):
    assert grammar_for(None) is None and grammar_for({"type": "text"}) is None
    assert StructuredOutput.from_response_format({"type": "text"}, tokenizer) is None


@pytest.mark.parametrize(
    ("response_format", "field"),
    [
        ("json", "response_format"),
        ({"type": "xml"}, "response_format.type"),
        ({"type": "json_schema"}, "response_format.json_schema"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema"),
        ({"type": "json_schema", "json_schema": {"schema": [1]}}, "response_format.json_schema.schema"),
        (_schema_format({"type": "nonsense"}), "response_format.json_schema.schema"),
        (_schema_format({"$ref": "#/definitions/missing"}), "response_format.json_schema.schema"),
    ],
)
def test_bad_response_format_names_the_field(tokenizer, response_format, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        StructuredOutput.from_response_format(response_format, tokenizer)


@pytest.mark.slow
def test_real_model_greedy_json_validates_against_the_schema(tokenizer):
    from model.checkpoint import load_model

    model = load_model(default_checkpoint(), dtype=torch.float32)
    messages = [{"role": "user", "content": "Give me a JSON object describing a person."}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt)
    matcher = StructuredOutput.from_response_format(_schema_format(PERSON), tokenizer, model.config.vocab_size)
    tokens, _ = _constrained_greedy(model, tokenizer, prompt, matcher, max_tokens=120)
    person = json.loads(tokenizer.decode(tokens))
    jsonschema.validate(person, PERSON)
    assert person["name"].strip()
