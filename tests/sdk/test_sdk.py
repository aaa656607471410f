"""The official SDKs, pointed at the proxy by base URL and nothing else, work as before."""

import anthropic
import openai
import pytest

from conftest import RUNAWAY_KEY, VIRTUAL_KEY


@pytest.fixture
def oai(proxy):
    return openai.OpenAI(base_url=f"{proxy}/openai/v1", api_key=VIRTUAL_KEY, max_retries=0)


@pytest.fixture
def claude(proxy):
    return anthropic.Anthropic(base_url=f"{proxy}/anthropic", api_key=VIRTUAL_KEY, max_retries=0)


def test_chat_completion(oai):
    reply = oai.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}]
    )
    assert reply.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4 "
    assert reply.usage.completion_tokens == 5


def test_streamed_chat_completion(oai):
    stream = oai.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "hello"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
    assert text == "tok0 tok1 tok2 tok3 tok4 "
    assert usage.completion_tokens == 5


def test_responses(oai):
    reply = oai.responses.create(model="gpt-4o-mini", input="hello")
    assert reply.output_text == "tok0 tok1 tok2 tok3 tok4 "
    assert reply.usage.output_tokens == 5


def test_streamed_responses(oai):
    deltas = []
    with oai.responses.stream(model="gpt-4o-mini", input="hello") as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = stream.get_final_response()
    assert "".join(deltas) == "tok0 tok1 tok2 tok3 tok4 "
    assert final.usage.output_tokens == 5


def test_embeddings(oai):
    reply = oai.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert len(reply.data) == 2
    assert reply.data[0].embedding[1] == pytest.approx(0.2)


def test_models(oai):
    ids = [m.id for m in oai.models.list()]
    assert "gpt-4o-mini" in ids


def test_wrong_key_raises_authentication_error(proxy):
    client = openai.OpenAI(base_url=f"{proxy}/openai/v1", api_key="tw-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        client.models.list()
    assert "tokenwarden" in str(err.value)


def test_anthropic_message(claude):
    reply = claude.messages.create(
        model="claude-sonnet-4-6", max_tokens=100, messages=[{"role": "user", "content": "hello"}]
    )
    assert reply.content[0].text == "tok0 tok1 tok2 tok3 tok4 "
    assert reply.usage.output_tokens == 5


def test_anthropic_streamed_message(claude):
    with claude.messages.stream(
        model="claude-sonnet-4-6", max_tokens=100, messages=[{"role": "user", "content": "hello"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "tok0 tok1 tok2 tok3 tok4 "
    assert final.usage.output_tokens == 5
    assert final.usage.input_tokens > 0


def test_anthropic_wrong_key_raises_authentication_error(proxy):
    client = anthropic.Anthropic(base_url=f"{proxy}/anthropic", api_key="sk-ant-wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        client.messages.create(model="claude-sonnet-4-6", max_tokens=10, messages=[])


def test_a_stream_cut_by_a_run_limit_raises_and_the_run_stays_stopped(proxy):
    client = openai.OpenAI(
        base_url=f"{proxy}/openai/v1",
        api_key=RUNAWAY_KEY,
        max_retries=0,
        default_headers={"x-tokenwarden-run": "sdk-openai-run", "x-mock-chunks": "200"},
    )
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "go on"}], stream=True
    )
    text = ""
    with pytest.raises(openai.APIError, match="max_tokens"):
        for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
    assert 0 < len(text.split()) < 200, "some text came before the cut, not all of it"
    with pytest.raises(openai.PermissionDeniedError, match="max_tokens"):
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "again"}]
        )


def test_an_anthropic_stream_cut_by_a_run_limit_raises(proxy):
    client = anthropic.Anthropic(
        base_url=f"{proxy}/anthropic",
        api_key=RUNAWAY_KEY,
        max_retries=0,
        default_headers={"x-tokenwarden-run": "sdk-anthropic-run", "x-mock-chunks": "200"},
    )
    text = ""
    with pytest.raises(anthropic.APIError, match="max_tokens"):
        with client.messages.stream(
            model="claude-sonnet-4-6",
            max_tokens=1000,
            messages=[{"role": "user", "content": "go on"}],
        ) as stream:
            for piece in stream.text_stream:
                text += piece
    assert 0 < len(text.split()) < 200
    with pytest.raises(anthropic.PermissionDeniedError, match="max_tokens"):
        client.messages.create(
            model="claude-sonnet-4-6",
            max_tokens=10,
            messages=[{"role": "user", "content": "again"}],
        )
