"""The WebUI's login page (with --token): the token as password, a signed expiring cookie in return.

Failed attempts count against the client's address in the same limiter the
API's token check uses, so the page is not a way around it.
"""

from __future__ import annotations

import html
from typing import Optional
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from api.auth import token_matches
from api.sessions import COOKIE

router = APIRouter(include_in_schema=False)

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>ChatLLM-WebUI: log in</title>
<style>
 body {{ font-family: system-ui, sans-serif; background: #f5f6fa; margin: 0; display: flex; min-height: 100vh;
        align-items: center; justify-content: center; }}
 form {{ background: #fff; padding: 2rem; border-radius: 12px; box-shadow: 0 2px 12px #0001; width: min(22rem, 90vw); }}
 h1 {{ font-size: 1.4rem; margin: 0 0 .5rem; }} p {{ color: #555; font-size: .9rem; }}
 label {{ display: block; margin: .8rem 0 .3rem; font-size: .9rem; }}
 input {{ width: 100%; box-sizing: border-box; padding: .55rem; border: 1px solid #ccd; border-radius: 6px; }}
 button {{ margin-top: 1.2rem; width: 100%; padding: .6rem; border: 0; border-radius: 6px; background: #4f46e5;
          color: #fff; font-size: 1rem; cursor: pointer; }}
 .error {{ color: #b91c1c; font-weight: 600; }}
</style></head><body>
<form method="post" action="/login">
 <h1>ChatLLM-WebUI</h1>
 <p>This service is protected: enter any user name and the service token as password.</p>
 {message}
 <label for="username">User name</label><input id="username" name="username" type="text" autocomplete="username">
 <label for="password">Password (service token)</label>
 <input id="password" name="password" type="password" autocomplete="current-password" required>
 <button type="submit">Login</button>
</form></body></html>"""


def _page(message: str = "", status: int = 200, headers: Optional[dict] = None) -> HTMLResponse:
    block = f'<p class="error" role="alert">{html.escape(message)}</p>' if message else ""
    return HTMLResponse(_PAGE.format(message=block), status_code=status, headers=headers)


@router.get("/login")
async def login_page(request: Request) -> Response:
    if not request.app.state.settings.token:
        return RedirectResponse("/", status_code=303)
    return _page()


@router.post("/login")
async def login(request: Request) -> Response:
    state = request.app.state
    token = state.settings.token
    if not token:
        return RedirectResponse("/", status_code=303)
    client = request.client.host if request.client else "?"
    wait = state.auth_failures.retry_after(client)
    if wait:
        return _page(f"Too many failed attempts. Try again in {int(wait) + 1} seconds.", 429,
                     {"Retry-After": str(int(wait) + 1)})
    # the guard has already bounded the body; a form is only a few fields
    fields = parse_qs((await request.body()).decode("utf-8", "replace"), max_num_fields=10)
    password = (fields.get("password") or [""])[0]
    if not token_matches(password, token):
        state.auth_failures.record(client)
        return _page("Incorrect user name or password.", 401)
    response = RedirectResponse("/", status_code=303)
    signer = state.sessions
    user = (fields.get("username") or [""])[0].strip()
    response.set_cookie(COOKIE, signer.issue(user=user), max_age=int(signer.ttl_seconds), httponly=True, samesite="lax",
                        secure=request.url.scheme == "https", path="/")
    return response


@router.get("/logout")
async def logout() -> Response:
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response
