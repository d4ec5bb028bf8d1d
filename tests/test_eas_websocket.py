"""The EAS WebSocket: per-connection history, <EOS> framing, errors that keep the socket open."""

import asyncio
import json

import requests
import websockets

from tests.eas_clients import run_websocket_conversation, split_answers

SYSTEM = "Act like you are programmer with 5+ years of experience."


def test_documented_multi_round_conversation(server):
    """The documented on_open_2 client: a system-prompt-only frame, then four prompts sent at once."""
    prompts = ["Please write a sorting algorithm in Python", "Now write it in Java", "Introduce yourself", "Summarize our conversation"]
    frames = [{"system_prompt": SYSTEM}] + [{"system_prompt": SYSTEM, "prompt": p, "max_new_tokens": 24} for p in prompts]
    messages = run_websocket_conversation(server.ws_url, "", frames, expect_eos=5)
    answers = split_answers(messages)
    assert len(answers) == 5, messages
    assert answers[0] == []  # the settings-only frame is answered by <EOS> alone
    for frames_of_answer in answers[1:]:
        assert frames_of_answer, "every prompt gets at least one answer frame"
        for earlier, later in zip(frames_of_answer, frames_of_answer[1:]):
            assert later.startswith(earlier)  # cumulative stream frames


async def _converse(url, frames, headers=None):
    """Send frames one by one and collect each answer (list of messages before <EOS>)."""
    answers = []
    async with websockets.connect(url, additional_headers=headers or {}) as ws:
        for frame in frames:
            await ws.send(frame if isinstance(frame, (str, bytes)) else json.dumps(frame))
            got = []
            while (msg := await asyncio.wait_for(ws.recv(), 120)) != "<EOS>":
                got.append(msg)
            answers.append(got)
    return answers


def test_connection_history_is_used_for_later_turns(server):
    """The fifth answer on the socket equals POST / given the same four turns as explicit history."""
    settings = {"do_sample": False, "max_new_tokens": 16}
    prompts = ["My name is Zorblax.", "I like green tea.", "I live in Oslo.", "I am a painter.", "What is my name?"]
    frames = [{"system_prompt": "You remember facts about the user."}] + [{**settings, "prompt": p} for p in prompts]
    answers = asyncio.run(_converse(server.ws_url, frames))
    finals = [a[-1] for a in answers[1:]]

    history = [[p, a] for p, a in zip(prompts[:4], finals[:4])]
    replay = requests.post(
        server.url,
        json={**settings, "prompt": prompts[4], "system_prompt": "You remember facts about the user.", "history": history},
        timeout=120,
    ).json()["response"]
    forgetful = requests.post(
        server.url, json={**settings, "prompt": prompts[4], "system_prompt": "You remember facts about the user."}, timeout=120
    ).json()["response"]
    assert finals[4] == replay
    assert replay != forgetful  # the history really changes the answer


def test_non_stream_frame_is_one_message(server):
    answers = asyncio.run(_converse(server.ws_url, [{"prompt": "Hi", "use_stream_chat": False, "max_new_tokens": 12}]))
    assert len(answers[0]) == 1 and answers[0][0]


def test_history_frame_replaces_connection_history(server):
    settings = {"do_sample": False, "max_new_tokens": 12}
    frames = [
        {**settings, "prompt": "Remember the number 4711."},
        {**settings, "prompt": "What number?", "history": [], "use_stream_chat": False},
    ]
    answers = asyncio.run(_converse(server.ws_url, frames))
    fresh = requests.post(server.url, json={**settings, "prompt": "What number?"}, timeout=120).json()["response"]
    assert answers[1] == [fresh]


def test_bad_frames_get_error_then_eos_and_socket_stays_open(server):
    frames = [
        '{"prompt": ',
        "[1, 2]",
        {"prompt": "hi", "max_new_tokens": "lots"},
        {"prompt": "hi", "top_p": 2},
        {"prompt": "hi", "history": [["only one"]]},
        {"prompt": "word " * 9000},
        {"prompt": "Say OK", "max_new_tokens": 4},
    ]
    answers = asyncio.run(_converse(server.ws_url, frames))
    errors = [json.loads(a[0])["error"] for a in answers[:6]]
    assert [e["param"] for e in errors] == ["body", "body", "max_new_tokens", "top_p", "history", "prompt"]
    assert "malformed JSON" in errors[0]["message"]
    assert "context" in errors[5]["message"]
    assert answers[6] and not answers[6][-1].startswith('{"error"')


def test_plain_text_frame_is_a_prompt(server):
    answers = asyncio.run(_converse(server.ws_url, ["Say hello"]))
    assert answers[0] and "error" not in answers[0][-1]
