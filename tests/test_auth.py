"""--token guards every API route and the WebSocket; both EAS and Bearer spellings work."""

import asyncio
import json

import pytest
import requests
import websockets

from tests.conftest import TOKEN
from tests.eas_clients import get_response, post_http_request, run_websocket_conversation, split_answers


@pytest.mark.parametrize("header", [None, "wrong", "Bearer wrong", f"Bearer{TOKEN}"])
def test_missing_or_wrong_token_is_401(secured_server, header):
    headers = {"Authorization": header} if header else {}
    response = requests.post(secured_server.url, json={"prompt": "hi"}, headers=headers, timeout=30)
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["type"] == "authentication_error"
    assert ("missing" in error["message"]) == (header is None)


@pytest.mark.parametrize("header", [TOKEN, f"Bearer {TOKEN}", f"bearer {TOKEN}"])
def test_bare_and_bearer_token_accepted(secured_server, header):
    response = post_http_request(secured_server.url, header, "Hi", max_new_tokens=4)
    assert response.status_code == 200
    output, history = get_response(response)
    assert history == [["Hi", output]]


def test_token_checked_before_body_is_parsed(secured_server):
    response = requests.post(secured_server.url, data=b"{broken", headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == 401


def test_websocket_without_token_is_refused(secured_server):
    async def attempt():
        async with websockets.connect(secured_server.ws_url):
            pass

    with pytest.raises(websockets.exceptions.InvalidStatus) as info:
        asyncio.run(attempt())
    assert info.value.response.status_code == 401
    assert json.loads(info.value.response.body)["error"]["type"] == "authentication_error"


def test_websocket_with_token_chats(secured_server):
    messages = run_websocket_conversation(secured_server.ws_url, TOKEN, [{"prompt": "Hi", "max_new_tokens": 6}], expect_eos=1)
    answers = split_answers(messages)
    assert len(answers) == 1 and answers[0]


def test_open_server_needs_no_token(server):
    assert requests.post(server.url, json={"prompt": "Hi", "max_new_tokens": 2}, timeout=60).status_code == 200
    assert requests.get(server.url + "/health", timeout=10).json()["auth"] is False
