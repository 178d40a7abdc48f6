"""The OpenAI routes through the official `openai` client against a live server (issue 13): prompts (echo, lists,
token ids), sampling fields, log probabilities, structured output, n choices."""

from __future__ import annotations

import collections

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
