"""The OpenAI routes through the official `openai` client against a live server (issue 13): prompts (echo, lists,
token ids), sampling fields, log probabilities, structured output, n choices."""

from __future__ import annotations

import collections
import json
import math

import httpx
import openai
import pytest
import torch

from tests.service.conftest import parse_sse, slow_down, wait_until

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


# ---- log probabilities (issue 13 item 1)


def _check_greedy_completion_logprobs(lp, n: int, text: str, offset: int = 0) -> None:
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) > 0
    for token, chosen, top, start in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, lp.text_offset, strict=True):
        assert chosen <= 0
        assert len(top) == n
        values = list(top.values())
        assert values == sorted(values, reverse=True)
        if n:  # greedy: the chosen token is the most likely one
            assert next(iter(top)) == token and values[0] == pytest.approx(chosen)
        assert text[start : start + len(token)] == token or "\ufffd" in token
    assert lp.text_offset[0] == offset


def test_completion_logprobs(oai):
    out = oai.completions.create(model="smollm", prompt="The cat", logprobs=3, **GREEDY)
    lp = out.choices[0].logprobs
    _check_greedy_completion_logprobs(lp, 3, out.choices[0].text)
    assert "".join(lp.tokens) == out.choices[0].text
    zero = oai.completions.create(model="smollm", prompt="The cat", logprobs=0, **GREEDY).choices[0].logprobs
    assert zero.token_logprobs == pytest.approx(lp.token_logprobs) and zero.top_logprobs == [{}] * 6
    plain = oai.completions.create(model="smollm", prompt="The cat", **GREEDY)
    assert plain.choices[0].logprobs is None and plain.choices[0].text == out.choices[0].text
    # Streamed: one token's logprobs per chunk, the same numbers.
    tokens, chosen = [], []
    for chunk in oai.completions.create(model="smollm", prompt="The cat", logprobs=3, stream=True, **GREEDY):
        c = chunk.choices[0]
        if c.finish_reason is None:
            assert len(c.logprobs.tokens) == 1 and len(c.logprobs.top_logprobs[0]) == 3
            tokens += c.logprobs.tokens
            chosen += c.logprobs.token_logprobs
    assert tokens == lp.tokens and chosen == pytest.approx(lp.token_logprobs)


def test_completion_logprobs_of_sampled_tokens_are_of_the_tempered_distribution(oai):
    out = oai.completions.create(
        model="smollm",
        prompt="The cat",
        logprobs=5,
        temperature=1.3,
        seed=7,
        max_tokens=8,
        extra_body={"ignore_eos": True},
    )
    lp = out.choices[0].logprobs
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        values = list(top.values())
        assert chosen <= max(values) + 1e-6 and values == sorted(values, reverse=True) and len(values) == 5
        assert math.fsum(math.exp(v) for v in values) <= 1 + 1e-5


def test_chat_logprobs(oai):
    req = {"model": "smollm", "messages": [{"role": "user", "content": "Hi"}], **GREEDY}
    out = oai.chat.completions.create(**req, logprobs=True, top_logprobs=4)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens == 6
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 4
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert entry.top_logprobs[0].token == entry.token and values[0] == pytest.approx(entry.logprob)
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token
    assert "".join(e.token for e in content) == out.choices[0].message.content
    bare = oai.chat.completions.create(**req, logprobs=True)
    assert [e.top_logprobs for e in bare.choices[0].logprobs.content] == [[]] * 6
    assert oai.chat.completions.create(**req).choices[0].logprobs is None
    streamed = []
    for chunk in oai.chat.completions.create(**req, logprobs=True, top_logprobs=2, stream=True):
        c = chunk.choices[0]
        if c.finish_reason is None:
            assert len(c.logprobs.content) == 1 and len(c.logprobs.content[0].top_logprobs) == 2
            streamed += c.logprobs.content
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content])


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("completions", {"logprobs": 6}, "logprobs"),
        ("completions", {"max_tokens": 0}, "max_tokens"),
        ("completions", {"max_tokens": -1}, "max_tokens"),
        ("chat", {"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ("chat", {"top_logprobs": 2}, "top_logprobs"),
    ],
)
def test_bad_logprobs_are_400(oai, route, body, param):
    with pytest.raises(openai.BadRequestError) as e:
        if route == "chat":
            oai.chat.completions.create(
                model="smollm", messages=[{"role": "user", "content": "Hi"}], max_tokens=2, extra_body=body
            )
        else:
            oai.completions.create(model="smollm", prompt="Hi", max_tokens=2, extra_body=body)
    assert e.value.body["param"] == param


def _prompt_logprobs(model, ids: list[int]) -> list[float]:
    """A direct forward pass: the logprob of each prompt token 1..T-1 is the log-softmax of the previous
    position's logits."""
    with torch.inference_mode():
        logits = model(torch.tensor([ids]))[0].float()  # (T, V)
    return torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1).tolist()


def _check_offsets(lp, text: str) -> None:
    assert lp.text_offset == sorted(lp.text_offset)
    for token, start in zip(lp.tokens, lp.text_offset, strict=True):
        assert text[start : start + len(token)] == token


def test_echo_with_logprobs_scores_the_prompt_then_the_completion(oai, live, tokenizer):
    prompt = "The cat sat on the mat"
    ids = _ids(tokenizer, prompt)
    plain = oai.completions.create(model="smollm", prompt=prompt, logprobs=2, **GREEDY)
    out = oai.completions.create(model="smollm", prompt=prompt, logprobs=2, echo=True, **GREEDY)
    c, T = out.choices[0], len(ids)
    assert c.text == prompt + plain.choices[0].text and out.usage == plain.usage
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == T + 6
    assert "".join(lp.tokens[:T]) == prompt
    # Nothing predicts the first prompt token: null logprob, null alternatives (OpenAI's and vLLM's shape).
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and lp.text_offset[0] == 0
    assert lp.token_logprobs[1:T] == pytest.approx(_prompt_logprobs(live.engine.runner.model, ids), abs=1e-4)
    for chosen, top in zip(lp.token_logprobs[1:T], lp.top_logprobs[1:T], strict=True):
        values = list(top.values())
        assert len(top) == 2 and values == sorted(values, reverse=True) and chosen <= values[0] + 1e-5
    # Then the completion, exactly as without echo, its offsets shifted by the echoed prompt.
    want = plain.choices[0].logprobs
    assert lp.tokens[T:] == want.tokens and lp.token_logprobs[T:] == pytest.approx(want.token_logprobs)
    assert lp.top_logprobs[T:] == want.top_logprobs
    assert lp.text_offset[T:] == [len(prompt) + o for o in want.text_offset]
    _check_offsets(lp, c.text)
    # Token-id prompts too, and logprobs=0: the prompt's logprobs without alternatives.
    by_ids = oai.completions.create(model="smollm", prompt=ids, logprobs=0, echo=True, **GREEDY).choices[0]
    assert by_ids.logprobs.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-4)
    assert by_ids.logprobs.top_logprobs == [None] + [{}] * (T + 5)


def test_echo_with_logprobs_streamed_and_with_n_choices(oai, tokenizer):
    prompt = "Once upon a time"
    T = len(_ids(tokenizer, prompt))
    full = oai.completions.create(model="smollm", prompt=prompt, logprobs=1, echo=True, **GREEDY).choices[0]
    chunks = list(oai.completions.create(model="smollm", prompt=prompt, logprobs=1, echo=True, stream=True, **GREEDY))
    first = chunks[0].choices[0]
    # The echo chunk comes first, with the prompt's logprobs (known once the prefill ran), then a chunk a token.
    assert first.text == prompt and first.logprobs.tokens == full.logprobs.tokens[:T]
    assert first.logprobs.token_logprobs[0] is None
    assert first.logprobs.token_logprobs[1:] == pytest.approx(full.logprobs.token_logprobs[1:T], abs=1e-4)
    tokens, offsets = [], []
    for chunk in chunks:
        c = chunk.choices[0]
        if c.logprobs is not None:
            tokens += c.logprobs.tokens
            offsets += c.logprobs.text_offset
    assert "".join(c.choices[0].text for c in chunks) == full.text
    assert tokens == full.logprobs.tokens and offsets == full.logprobs.text_offset
    # n = 2 sampled choices share one prefill: both carry the prompt's logprobs.
    two = oai.completions.create(
        model="smollm", prompt=prompt, logprobs=1, echo=True, n=2, temperature=1.0, seed=5, max_tokens=4
    )
    for c in two.choices:
        assert c.text.startswith(prompt)
        assert c.logprobs.token_logprobs[1:T] == pytest.approx(full.logprobs.token_logprobs[1:T], abs=1e-4)
        _check_offsets(c.logprobs, c.text)


def test_echo_with_max_tokens_0_scores_the_prompt_only(oai, live, tokenizer):
    prompt = "The cat sat on the mat"
    ids = _ids(tokenizer, prompt)
    out = oai.completions.create(model="smollm", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    c = out.choices[0]
    assert c.text == prompt and c.finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), 0)
    assert c.logprobs.tokens == [tokenizer.decode([t]) for t in ids]
    assert c.logprobs.token_logprobs[1:] == pytest.approx(_prompt_logprobs(live.engine.runner.model, ids), abs=1e-4)
    _check_offsets(c.logprobs, c.text)
    bare = oai.completions.create(model="smollm", prompt=prompt, max_tokens=0, echo=True)
    assert bare.choices[0].text == prompt and bare.choices[0].logprobs is None
    chunks = list(
        oai.completions.create(
            model="smollm",
            prompt=prompt,
            max_tokens=0,
            echo=True,
            logprobs=1,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert [ch.choices[0].text for ch in chunks if ch.choices] == [prompt, ""]
    assert chunks[0].choices[0].logprobs.tokens == c.logprobs.tokens
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices] == [None, "length"]
    assert chunks[-1].usage.completion_tokens == 0


def test_generate_logprobs_extension(live):
    req = {"prompt": "The cat", "max_tokens": 5, "temperature": 0, "ignore_eos": True, "logprobs": 2}
    body = httpx.post(live.url + "/v1/generate", json=req, timeout=30).json()
    assert len(body["logprobs"]) == 5
    for entry in body["logprobs"]:
        assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 2
        assert entry["top_logprobs"][0]["token_id"] == entry["token_id"]
    r = httpx.post(live.url + "/v1/generate", json={**req, "stream": True}, timeout=30)
    tokens = [json.loads(d) for e, d in parse_sse(r.text) if e == "token"]
    assert [t["logprobs"]["token_id"] for t in tokens] == [e["token_id"] for e in body["logprobs"]]
    plain = httpx.post(live.url + "/v1/generate", json={**req, "logprobs": None}, timeout=30).json()
    assert "logprobs" not in plain  # the documented shape when not asked


# ---- structured output (issue 13 item 7)

CHOICE_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no"]}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["answer", "n"],
    "additionalProperties": False,
}


def test_json_schema_output_parses_and_validates(oai):
    fmt = {"type": "json_schema", "json_schema": {"name": "choice", "schema": CHOICE_SCHEMA}}
    out = oai.chat.completions.create(
        model="smollm",
        messages=[{"role": "user", "content": "Yes or no?"}],
        temperature=0,
        max_tokens=40,
        response_format=fmt,
    )
    assert out.choices[0].finish_reason == "stop", out.choices[0].message.content
    value = json.loads(out.choices[0].message.content)
    assert set(value) == {"answer", "n"} and value["answer"] in ("yes", "no") and 0 <= value["n"] <= 9
    # Sampled, on completions and with several prompts: every choice follows the schema.
    many = oai.completions.create(
        model="smollm",
        prompt=["A", "B", "C"],
        temperature=1.0,
        seed=1,
        max_tokens=40,
        extra_body={"response_format": fmt},
    )
    for choice in many.choices:
        assert choice.finish_reason == "stop" and json.loads(choice.text)["answer"] in ("yes", "no")


def test_json_object_output_is_json_so_far(oai):
    out = oai.chat.completions.create(
        model="smollm",
        messages=[{"role": "user", "content": "Give me JSON"}],
        temperature=0,
        max_tokens=24,
        response_format={"type": "json_object"},
    )
    text = out.choices[0].message.content
    assert text.startswith("{"), text
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:  # cut by max_tokens: a prefix of a JSON object, which closing what is open completes
        assert _completes_as_json(text), text
    plain = oai.chat.completions.create(
        model="smollm",
        messages=[{"role": "user", "content": "Give me JSON"}],
        temperature=0,
        max_tokens=24,
        response_format={"type": "text"},
    )
    assert plain.choices[0].message.content != text


def _completes_as_json(prefix: str) -> bool:
    """Whether `prefix` is the start of a JSON document: some closing of its open strings and brackets parses."""
    stack, in_string, escaped = [], False, False
    for c in prefix:
        if in_string:
            escaped = not escaped and c == "\\"
            if c == '"' and not escaped:
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "{[":
            stack.append("}" if c == "{" else "]")
        elif c in "}]":
            stack.pop()
    base = prefix + ('"' if in_string else "")
    for tail in ("", "null", ":null", '"":null', "0"):
        try:
            json.loads(base.rstrip(",") + tail + "".join(reversed(stack)))
            return True
        except json.JSONDecodeError:
            continue
    return False


@pytest.mark.parametrize(
    "fmt",
    [{"type": "xml"}, {"type": "json_schema"}, {"type": "json_schema", "json_schema": {"schema": 3}}, "json"],
)
def test_bad_response_format_is_400(oai, fmt):
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(
            model="smollm", messages=[{"role": "user", "content": "Hi"}], max_tokens=2, response_format=fmt
        )
    assert e.value.body["param"].startswith("response_format")


# ---- n choices and best_of (issue 13 item 2)


def test_n_choices_sampled_with_their_own_seed_streams(oai):
    req = {
        "model": "smollm",
        "prompt": "The cat",
        "temperature": 1.0,
        "max_tokens": 8,
        "extra_body": {"ignore_eos": True},
    }
    out = oai.completions.create(**req, n=3, seed=11)
    assert [c.index for c in out.choices] == [0, 1, 2]
    texts = [c.text for c in out.choices]
    assert len(set(texts)) > 1  # three seed streams, not one answer thrice
    # Choice j follows seed 11 + j: each equals a single request with that seed.
    assert [oai.completions.create(**req, seed=11 + j).choices[0].text for j in range(3)] == texts
    one = oai.completions.create(**req, seed=11)
    assert out.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt is counted once
    assert out.usage.completion_tokens == 24
    # Two prompts x two choices: indices prompt-major.
    both = oai.completions.create(**{**req, "prompt": ["The cat", "A dog"]}, n=2, seed=11)
    assert [c.text for c in both.choices[:2]] == texts[:2]


def test_n_choices_streamed_with_logprobs(oai):
    req = {"model": "smollm", "temperature": 1.0, "max_tokens": 6, "seed": 5, "extra_body": {"ignore_eos": True}}
    full = oai.chat.completions.create(**req, messages=[{"role": "user", "content": "Hi"}], n=2, logprobs=True)
    assert len(full.choices) == 2 and full.usage.completion_tokens == 12
    stream = oai.chat.completions.create(
        **req,
        messages=[{"role": "user", "content": "Hi"}],
        n=2,
        logprobs=True,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts: dict[int, str] = collections.defaultdict(str)
    lps: dict[int, list[float]] = collections.defaultdict(list)
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.logprobs is not None:
                lps[c.index] += [e.logprob for e in c.logprobs.content]
    assert texts == {i: full.choices[i].message.content for i in range(2)}
    for i in range(2):
        assert lps[i] == pytest.approx([e.logprob for e in full.choices[i].logprobs.content])
    assert usage == full.usage
    completions = oai.completions.create(**req, prompt="The cat", n=2, logprobs=1, stream=True)
    seen = collections.Counter(c.index for chunk in completions for c in chunk.choices if c.logprobs is not None)
    assert seen == {0: 6, 1: 6}


def test_best_of_returns_the_highest_cumulative_logprobs(oai):
    req = {
        "model": "smollm",
        "prompt": "The cat",
        "temperature": 1.0,
        "max_tokens": 6,
        "seed": 3,
        "extra_body": {"ignore_eos": True},
    }
    every = oai.completions.create(**req, n=4, logprobs=0)
    ranked = sorted(every.choices, key=lambda c: -sum(c.logprobs.token_logprobs))
    best = oai.completions.create(**req, n=2, best_of=4)
    assert [c.text for c in best.choices] == [c.text for c in ranked[:2]]
    assert [c.index for c in best.choices] == [0, 1] and best.choices[0].logprobs is None
    assert best.usage.completion_tokens == 24  # every candidate generated counts


def test_leaving_a_stream_of_several_choices_cancels_them_all(live):
    slow_down(live.engine, 0.02)  # 1500 steps take >= 30 s: only cancelling ends them within the wait below
    try:
        body = {"prompt": ["The cat", "A dog"], "n": 2, "max_tokens": 1500, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", live.url + "/v1/completions", json=body, timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    break
            assert wait_until(lambda: len(live.engine.scheduler.running) == 4)
        assert wait_until(live.engine.idle, timeout=10)  # all four sequences were cancelled, none ran to the end
    finally:
        del live.engine.runner.run  # slow_down's instance attribute: back to the class's method
