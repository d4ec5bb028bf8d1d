"""The WebUI in headless Chromium: streaming, Stop, knowledge upload with sources, sessions, login.

Screenshots of every step go to tests/artifacts/.
"""

from __future__ import annotations

import time
from typing import Optional

import pytest
import requests
from playwright.sync_api import Page, expect

from tests.conftest import CHROMIUM, RAG_DEV, TOKEN


pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium is not installed (make test installs it)")


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.goto(server.url + "/")
    page.wait_for_selector("#chat-input textarea", timeout=60_000)
    yield page
    context.close()


def _bot_texts(page: Page, window: str = "#chat-window") -> list[str]:
    return [t.strip() for t in page.locator(f'{window} [data-testid="bot"]').all_inner_texts()]


def _settled(page: Page, window: str = "#chat-window", quiet: float = 1.0) -> list[str]:
    """The answers once the page has stopped changing for `quiet` seconds."""
    last, since = None, time.monotonic()
    while True:
        now = _bot_texts(page, window)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return now
        time.sleep(0.1)


def _engine(server) -> dict:
    return requests.get(server.url + "/health", timeout=10).json()["engine"]


def _set_max_tokens(page: Page, value: int, prefix: str = "chat") -> None:
    accordion = page.locator(f"#{prefix}-params")
    box = page.locator(f"#{prefix}-max-new-tokens input[type=number]")
    if not box.is_visible():
        accordion.get_by_text("Parameters").click()
    slider = page.locator(f"#{prefix}-max-new-tokens input[type=range]")
    for _ in range(5):  # the page may still be wiring its events; retry until the slider follows
        box.fill(str(value))
        box.press("Enter")
        box.press("Tab")
        try:
            expect(slider).to_have_value(str(value), timeout=2_000)
            return
        except AssertionError:
            continue
    expect(slider).to_have_value(str(value))


def _wait_idle(server, timeout: float = 120, requests_before: Optional[int] = None) -> None:
    """Wait until the engine has taken the request (when `requests_before` is given) and is idle again."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = _engine(server)
        taken = requests_before is None or state["requests"] > requests_before
        if taken and state["running"] == 0 and state["waiting"] == 0:
            break
        time.sleep(0.1)
    time.sleep(0.5)  # the last update reaches the page


def _send(page: Page, text: str, box: str = "#chat-input textarea", button: str | None = None) -> None:
    page.fill(box, text)
    if button:
        page.click(button)
    else:
        page.press(box, "Enter")


def test_page_title_status_and_streamed_answer(page, server, artifacts):
    assert page.title() == "ChatLLM-WebUI"
    status = page.locator("#status-line").inner_text()
    assert "SmolLM2-135M-Instruct" in status and "Knowledge base" in status
    page.screenshot(path=artifacts / "01-page.png", full_page=True)

    _set_max_tokens(page, 60)
    requests_before = _engine(server)["requests"]
    _send(page, "Write a short poem about the sea.", button="#chat-send")
    expect(page.locator('#chat-window [data-testid="user"]')).to_have_text("Write a short poem about the sea.")
    page.wait_for_function("() => { const b = document.querySelectorAll('#chat-window [data-testid=\"bot\"]'); return b.length && b[b.length-1].innerText.trim().length > 0; }", timeout=60_000)
    early = _bot_texts(page)[-1]
    page.screenshot(path=artifacts / "02-streaming.png", full_page=True)
    _wait_idle(server, requests_before=requests_before)
    final = _settled(page)[-1]
    page.screenshot(path=artifacts / "03-answered.png", full_page=True)
    assert len(final) > len(early), "the answer should grow while it streams"
    assert final.startswith(early[: max(1, len(early) - 2)])
    assert page.input_value("#chat-input textarea") == ""


def test_stop_ends_the_generation_on_the_server(page, server, artifacts):
    before = _engine(server)
    page.locator("#chat-window").scroll_into_view_if_needed()
    _send(page, "Write a very long and detailed essay about the history of Europe.")
    page.wait_for_function("() => { const b = document.querySelectorAll('#chat-window [data-testid=\"bot\"]'); return b.length && b[b.length-1].innerText.trim().length > 20; }", timeout=60_000)
    assert _engine(server)["running"] == 1
    page.click("#chat-stop")
    stopped_at = time.monotonic()
    while _engine(server)["running"] and time.monotonic() - stopped_at < 5:
        time.sleep(0.05)
    after = _engine(server)
    page.screenshot(path=artifacts / "04-stopped.png", full_page=True)
    assert after["running"] == 0, "Stop must end the request in the engine"
    assert after["aborted"] == before["aborted"] + 1
    shown = _bot_texts(page)[-1]
    time.sleep(1.0)
    assert _bot_texts(page)[-1] == shown  # nothing more arrives after Stop


def test_regenerate_and_clear(page, server, artifacts):
    _set_max_tokens(page, 30)
    page.locator("#chat-do-sample input").uncheck()
    before = _engine(server)["requests"]
    _send(page, "Name one fruit.")
    _wait_idle(server, requests_before=before)
    first = _settled(page)
    assert len(first) == 1 and first[0]
    before = _engine(server)["requests"]
    page.click("#chat-regenerate")
    _wait_idle(server, requests_before=before)
    assert _settled(page) == first  # greedy: the same single answer again, not a second one
    assert page.locator('#chat-window [data-testid="user"]').count() == 1
    page.click("#chat-clear")
    expect(page.locator('#chat-window [data-testid="user"]')).to_have_count(0)


def test_untouched_sliders_answer_with_the_model_defaults(page, server, artifacts):
    """The sliders open at the embedded model's recommended values; sampled with them, Paris 9 times in 10."""
    page.locator("#chat-params").get_by_text("Parameters").click()
    for slider, value in (("max-new-tokens", "512"), ("temperature", "0.2"), ("top-p", "0.5"), ("top-k", "30")):
        expect(page.locator(f"#chat-{slider} input[type=range]")).to_have_value(value)
    expect(page.locator("#chat-do-sample input")).to_be_checked()
    answers = []
    for _ in range(10):
        before, started = _engine(server)["requests"], time.monotonic()
        _send(page, "What is the capital of France?")
        _wait_idle(server, timeout=60, requests_before=before)
        assert time.monotonic() - started < 30
        answers.append(_settled(page)[-1])
        page.click("#chat-clear")
        expect(page.locator('#chat-window [data-testid="user"]')).to_have_count(0)
    page.screenshot(path=artifacts / "04b-default-sampling.png", full_page=True)
    assert sum("paris" in a.lower() for a in answers) >= 9, answers


def test_errors_are_shown_in_the_page(page, server, artifacts):
    page.fill("#chat-input textarea", "word " * 9000)
    page.click("#chat-send")
    expect(page.locator("#chat-window")).to_contain_text("Error: the prompt is", timeout=60_000)
    expect(page.locator("#chat-window")).to_contain_text("8192 tokens")
    page.screenshot(path=artifacts / "05-error.png", full_page=True)


def test_two_browsers_keep_separate_histories(browser, server, artifacts):
    pages = []
    requests_before = _engine(server)["requests"]
    for secret in ("Alice", "Bob"):
        context = browser.new_context(viewport={"width": 1000, "height": 800})
        page = context.new_page()
        page.goto(server.url + "/")
        page.wait_for_selector("#chat-input textarea", timeout=60_000)
        _set_max_tokens(page, 40)
        _send(page, f"My name is {secret}.")
        pages.append((secret, context, page))
    _wait_idle(server)
    while _engine(server)["requests"] < requests_before + 2:
        time.sleep(0.1)
    _wait_idle(server)
    for secret, context, page in pages:
        users = page.locator('#chat-window [data-testid="user"]').all_inner_texts()
        assert users == [f"My name is {secret}."]
        page.screenshot(path=artifacts / f"06-session-{secret.lower()}.png", full_page=True)
        context.close()


def test_upload_vectorise_and_answer_with_sources(page, server, artifacts, tmp_path):
    page.get_by_role("tab", name="LangChain").click()
    kb = f"browser{int(time.time())}"
    page.locator("#kb-select input").fill(kb)
    page.locator("#kb-select input").press("Enter")
    notes = tmp_path / "team_notes.md"
    notes.write_text("# Team notes\n\nThe office plant is called Gerald and is watered on Mondays.\n")
    page.locator("#kb-files input[type=file]").set_input_files([str(RAG_DEV / "docs" / "deepspeed_advanced_install.pdf"), str(notes)])
    expect(page.locator("#kb-files")).to_contain_text("team_notes", timeout=30_000)  # name and extension render apart
    page.screenshot(path=artifacts / "07-files-chosen.png", full_page=True)
    page.click("#kb-vectorise")
    saw_progress = False
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if page.locator(".progress-text, .progress-level, .eta-bar").count():
            saw_progress = True
            page.screenshot(path=artifacts / "08-vectorising.png", full_page=True)
        # the progress bar's own label may read "done - 100.0%" before the result table replaces it
        if f"Knowledge base {kb}: done" in page.locator("#kb-result").inner_text().replace("`", ""):
            break
        time.sleep(0.1)
    result = page.locator("#kb-result").inner_text()
    page.screenshot(path=artifacts / "09-vectorised.png", full_page=True)
    assert f"Knowledge base {kb}: done" in result.replace("`", "")
    assert "deepspeed_advanced_install.pdf" in result and "team_notes.md" in result and "added" in result
    assert saw_progress, "a progress bar should show while vectorising"
    expect(page.locator("#kb-file-table")).to_contain_text("deepspeed_advanced_install.pdf")
    expect(page.locator("#status-line")).to_contain_text("chunks loaded")

    _set_max_tokens(page, 60, prefix="kb")
    _send(page, "How do I skip the CUDA version mismatch check when building DeepSpeed?", box="#kb-chat-input textarea", button="#kb-chat-send")
    expect(page.locator("#kb-chat-window")).to_contain_text("Sources", timeout=120_000)
    page.locator("#kb-chat-window").get_by_text("Sources").first.click()
    expect(page.locator("#kb-chat-window")).to_contain_text("deepspeed_advanced_install.pdf", timeout=10_000)
    expect(page.locator("#kb-chat-window")).to_contain_text("page")
    page.screenshot(path=artifacts / "10-answer-with-sources.png", full_page=True)


def test_narrow_phone_window(browser, server, artifacts):
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page = context.new_page()
    page.goto(server.url + "/")
    page.wait_for_selector("#chat-input textarea", timeout=60_000)
    overflow = page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
    page.screenshot(path=artifacts / "11-phone.png", full_page=True)
    assert overflow <= 1, f"page is {overflow}px wider than the phone screen"
    assert page.locator("#chat-send").is_visible() and page.locator("#chat-stop").is_visible()
    context.close()


def test_token_protected_page_asks_for_login(browser, secured_server, artifacts):
    context = browser.new_context(viewport={"width": 1000, "height": 800})
    page = context.new_page()
    page.goto(secured_server.url + "/")
    page.wait_for_selector("input[type=password]", timeout=60_000)
    assert page.locator("#chat-input").count() == 0  # nothing of the app before login
    page.screenshot(path=artifacts / "12-login.png", full_page=True)
    page.locator("input[type=text]").first.fill("me")
    page.locator("input[type=password]").fill("wrong")
    page.get_by_role("button", name="Login").click()
    expect(page.locator("body")).to_contain_text("Incorrect", timeout=10_000)
    page.screenshot(path=artifacts / "12b-login-refused.png", full_page=True)
    page.locator("input[type=text]").first.fill("me")
    page.locator("input[type=password]").fill(TOKEN)
    page.get_by_role("button", name="Login").click()
    page.wait_for_selector("#chat-input textarea", timeout=60_000)
    page.screenshot(path=artifacts / "13-logged-in.png", full_page=True)
    context.close()
