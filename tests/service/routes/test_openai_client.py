"""The OpenAI routes through the official `openai` client against a live server (issue 13): prompts (echo, lists,
token ids), sampling fields, log probabilities, structured output, n choices."""

from __future__ import annotations

import collections

import httpx
import openai
import pytest

GREEDY = {"temperature": 0, "max_tokens": 6, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def oai(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)


# ---- prompts (issue 13 item 4)


def test_echo_prepends_the_prompt(oai, tokenizer):
    plain = oai.completions.create(model="smollm", prompt="The cat", **GREEDY)
    echoed = oai.completions.create(model="smollm", prompt="The cat", echo=True, **GREEDY)
    assert echoed.choices[0].text == "The cat" + plain.choices[0].text
    assert echoed.usage == plain.usage
    ids = tokenizer.encode("The dog")
    by_ids = oai.completions.create(model="smollm", prompt=ids, echo=True, **GREEDY)
    assert by_ids.choices[0].text.startswith(tokenizer.decode(ids))
    chunks = list(oai.completions.create(model="smollm", prompt="The cat", echo=True, stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks) == echoed.choices[0].text


def test_a_list_of_prompts_gives_one_choice_each_in_order(oai, tokenizer):
    prompts = ["The cat", "Once upon a time there", "Hi"]
    alone = [oai.completions.create(model="smollm", prompt=p, **GREEDY) for p in prompts]
    both = oai.completions.create(model="smollm", prompt=prompts, **GREEDY)
    assert [c.index for c in both.choices] == [0, 1, 2]
    assert [c.text for c in both.choices] == [a.choices[0].text for a in alone]
    assert both.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert both.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone) == 18
    assert both.usage.total_tokens == both.usage.prompt_tokens + both.usage.completion_tokens
    # The same prompts as token ids.
    ids = oai.completions.create(model="smollm", prompt=[tokenizer.encode(p) for p in prompts], **GREEDY)
    assert [c.text for c in ids.choices] == [c.text for c in both.choices]


def test_a_streamed_list_of_prompts_tags_each_chunk_with_its_choice(oai):
    prompts = ["The cat", "Once upon a time there"]
    full = oai.completions.create(model="smollm", prompt=prompts, **GREEDY)
    stream = oai.completions.create(
        model="smollm", prompt=prompts, stream=True, stream_options={"include_usage": True}, **GREEDY
    )
    texts: dict[int, str] = collections.defaultdict(str)
    finished, usage = {}, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason is not None:
                finished[c.index] = c.finish_reason
    assert texts == {0: full.choices[0].text, 1: full.choices[1].text}
    assert finished == {0: "length", 1: "length"}
    assert usage == full.usage


@pytest.mark.parametrize(
    ("prompt", "param"),
    [(["ok", ""], "prompt"), ([[1, 2], []], "prompt"), ([[1, 2], [10**7]], "prompt.1"), (["x"] * 65, "prompt")],
)
def test_bad_prompts_are_400_naming_the_field(oai, prompt, param):
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="smollm", prompt=prompt, max_tokens=2)
    assert e.value.body["param"] == param


# ---- sampling fields (issue 13 item 3)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def test_logit_bias_forces_a_token_under_greedy(oai, tokenizer):
    tok = _ids(tokenizer, " banana")[0]
    out = oai.completions.create(model="smollm", prompt="The cat", logit_bias={str(tok): 100}, **GREEDY)
    assert out.choices[0].text == tokenizer.decode([tok] * 6)
    chat = oai.chat.completions.create(
        model="smollm", messages=[{"role": "user", "content": "Hi"}], logit_bias={str(tok): 100}, **GREEDY
    )
    assert chat.choices[0].message.content == tokenizer.decode([tok] * 6)
    # A ban: the token greedy picks first is never picked again.
    plain = oai.completions.create(model="smollm", prompt="The cat", **{**GREEDY, "max_tokens": 12})
    first = _ids(tokenizer, plain.choices[0].text)[0]
    banned = oai.completions.create(
        model="smollm", prompt="The cat", logit_bias={str(first): -100}, **{**GREEDY, "max_tokens": 12}
    )
    assert banned.choices[0].text != plain.choices[0].text


def test_frequency_penalty_changes_a_repetitive_greedy_output(oai, live):
    # Force a repetitive output first: the tiny model's greedy text, then the same with a strong penalty.
    req = {
        "model": "smollm",
        "prompt": "a a a a a a a a",
        "temperature": 0,
        "max_tokens": 24,
        "extra_body": {"ignore_eos": True},
    }
    plain = oai.completions.create(**req).choices[0].text
    words = plain.split()
    assert len(set(words)) < len(words), plain  # the premise: greedy repeats itself here
    penalised = oai.completions.create(**req, frequency_penalty=2.0).choices[0].text
    presence = oai.completions.create(**req, presence_penalty=2.0).choices[0].text
    assert penalised != plain and presence != plain
    assert len(set(penalised.split())) > len(set(words))
    rep = oai.completions.create(**{**req, "extra_body": {"ignore_eos": True, "repetition_penalty": 5.0}})
    assert rep.choices[0].text != plain


def test_stop_token_ids_and_min_tokens(oai, tokenizer):
    tok = _ids(tokenizer, " banana")[0]
    req = {"model": "smollm", "prompt": "The cat", "temperature": 0, "max_tokens": 8}
    # Forced to the token at every step, and told to stop on it: the first token ends the answer.
    out = oai.completions.create(**req, logit_bias={str(tok): 100}, extra_body={"stop_token_ids": [tok]})
    assert out.choices[0].finish_reason == "stop" and out.usage.completion_tokens == 1
    # min_tokens masks the stop id until 5 tokens were generated: the forced token cannot be picked before that.
    out = oai.completions.create(
        **req, logit_bias={str(tok): 100}, extra_body={"stop_token_ids": [tok], "min_tokens": 5}
    )
    assert out.choices[0].finish_reason == "stop" and out.usage.completion_tokens == 6


def test_min_p_keeps_only_the_top_token_at_1(oai):
    req = {"model": "smollm", "prompt": "The cat", "max_tokens": 8, "extra_body": {"ignore_eos": True}}
    greedy = oai.completions.create(**req, temperature=0).choices[0].text
    for seed in (1, 2, 3):
        out = oai.completions.create(
            **{**req, "extra_body": {"ignore_eos": True, "min_p": 1.0}}, temperature=1.5, seed=seed
        )
        assert out.choices[0].text == greedy


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3),
        ("repetition_penalty", 0),
        ("min_p", 1.5),
        ("logit_bias", {"50": 101}),
        ("logit_bias", {"abc": 1}),
        ("logit_bias", {"10000000": 1}),
        ("min_tokens", -1),
        ("stop_token_ids", [10**7]),
        ("stop_token_ids", [-1]),
        ("seed", -1),
    ],
)
def test_bad_sampling_values_are_refused_naming_the_field(oai, live, field, value):
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="smollm", prompt="Hi", max_tokens=2, extra_body={field: value})
    assert e.value.body["param"].split(".")[0] == field
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(
            model="smollm", messages=[{"role": "user", "content": "Hi"}], max_tokens=2, extra_body={field: value}
        )
    assert e.value.body["param"].split(".")[0] == field
    r = httpx.post(live.url + "/v1/generate", json={"prompt": "Hi", "max_tokens": 2, field: value}, timeout=30)
    assert r.status_code == 422 and r.json()["error"]["param"].split(".")[0] == field


def test_generate_takes_the_same_sampling_fields(live, tokenizer):
    tok = _ids(tokenizer, " banana")[0]
    r = httpx.post(
        live.url + "/v1/generate",
        json={
            "prompt": "The cat",
            "max_tokens": 8,
            "temperature": 0,
            "logit_bias": {str(tok): 100},
            "stop_token_ids": [tok],
            "min_tokens": 2,
            "frequency_penalty": 0.5,
            "seed": 3,
        },
        timeout=30,
    )
    assert r.status_code == 200, r.text
    assert r.json()["finish_reason"] == "stop" and r.json()["usage"]["completion_tokens"] == 3
