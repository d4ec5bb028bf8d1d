"""Meeting an OpenAI-compatible inference server at start-up: wait for it, then learn what it serves and takes."""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional

import httpx

from engine.generation_defaults import load_generation_defaults
from engine.remote import EXTENSIONS, RemoteEngine, RemoteSettings, ServerFacts
from engine.remote_errors import explain_transport_error
from engine.types import ModelLoadError

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 10.0
#: model-listing fields different servers use for the context window
CONTEXT_FIELDS = ("max_model_len", "context_length", "context_window", "max_context_length")


def connect_remote(settings: RemoteSettings, generation_config: str = "auto",
                   alive: Optional[Callable[[], Optional[str]]] = None) -> RemoteEngine:
    """Wait up to `settings.wait` for the server, then build the engine; raises ModelLoadError with the reason.

    `alive` (for a supervised engine) returns why the server process is gone, or None while it runs.
    Sampling defaults: a remote server applies its model's own only to fields left out, and every
    request from here spells all of them out; so they come from `--generation-config` (a directory),
    or for `auto` from the recommendations for the served model's name, else the protocol's.
    """
    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
    with httpx.Client(timeout=httpx.Timeout(30.0, connect=5.0), headers=headers) as client:
        listing = _wait_for_models(client, settings, alive)
        facts = _pick_model(listing, settings)
        supported = _probe_extensions(client, settings, facts.model)
        counts = _probe_tokenize(client, settings, facts.model)
    defaults = load_generation_defaults(generation_config, None, None, facts.model)
    engine = RemoteEngine(settings, facts, supported, counts, defaults)
    log.info("inference engine at %s serves %s (context %d tokens, by %s); sampling extensions taken: %s; "
             "token counts: %s", settings.url, engine.model_name, engine.max_model_len, facts.owned_by or "?",
             ", ".join(sorted(supported)) or "none", "its /tokenize" if counts else "estimated here")
    return engine


def _wait_for_models(client: httpx.Client, settings: RemoteSettings, alive) -> dict:
    started = time.monotonic()
    last_report, problem = started, "no answer yet"
    while True:
        gone = alive() if alive is not None else None
        if gone:
            raise ModelLoadError(gone)
        try:
            response = client.get(settings.url + "/models", timeout=5.0)
            if response.status_code == 200:
                return response.json()
            problem = f"GET /models answered {response.status_code}: {response.text[:200]}"
            if response.status_code in (401, 403):
                raise ModelLoadError(f"the inference engine at {settings.url} refused our credentials "
                                     f"({response.status_code}); check --engine-api-key")
            if response.status_code >= 500 and settings.model:
                # some servers (transformers serve with a local model) cannot list; the named model is enough
                log.warning("the inference engine at %s cannot list its models (%s); using --engine-model %s",
                            settings.url, problem, settings.model)
                return {"data": [], "unlisted": True}
        except httpx.HTTPError as exc:
            problem = explain_transport_error(settings.url, exc)
        waited = time.monotonic() - started
        if waited >= settings.wait:
            raise ModelLoadError(f"the inference engine at {settings.url} was not ready after {waited:.0f} s "
                                 f"(--engine-wait): {problem}")
        if time.monotonic() - last_report >= PROGRESS_EVERY_S:
            last_report = time.monotonic()
            log.info("waiting for the inference engine at %s (%.0f s of %.0f): %s", settings.url, waited,
                     settings.wait, problem)
        time.sleep(0.5)


def _pick_model(listing: dict, settings: RemoteSettings) -> ServerFacts:
    models = [m for m in (listing.get("data") or []) if isinstance(m, dict) and m.get("id")]
    if settings.model:
        chosen = next((m for m in models if m["id"] == settings.model), None)
        if chosen is None and models:
            raise ModelLoadError(f"the inference engine at {settings.url} does not serve {settings.model!r} "
                                 f"(--engine-model); it serves: {', '.join(m['id'] for m in models[:20])}")
        chosen = chosen or {"id": settings.model}  # some servers list nothing but serve what is asked for
    elif models:
        chosen = models[0]
        if len(models) > 1:
            log.info("the inference engine serves %d models; using %s (choose with --engine-model)",
                     len(models), chosen["id"])
    else:
        raise ModelLoadError(f"the inference engine at {settings.url} lists no model; name one with --engine-model")
    context = next((chosen[f] for f in CONTEXT_FIELDS if isinstance(chosen.get(f), int) and chosen[f] > 0), None)
    return ServerFacts(model=chosen["id"], max_model_len=context, owned_by=str(chosen.get("owned_by") or ""),
                       lists_models=not listing.get("unlisted", False))


def _probe_extensions(client: httpx.Client, settings: RemoteSettings, model: str) -> frozenset[str]:
    """Which of top_k, repetition_penalty, ignore_eos the server takes: those its 400/422 names are out."""
    remaining = set(EXTENSIONS)
    neutral = {"top_k": 1, "repetition_penalty": 1.0, "ignore_eos": False}
    for _ in range(len(EXTENSIONS) + 1):
        body = {"model": model, "max_tokens": 1, "temperature": 0.0,
                "messages": [{"role": "user", "content": "Hi"}], **{k: neutral[k] for k in remaining}}
        try:
            response = client.post(settings.url + "/chat/completions", json=body)
        except httpx.HTTPError as exc:
            log.warning("could not probe the engine's sampling fields (%s); assuming it takes none of %s",
                        exc, ", ".join(EXTENSIONS))
            return frozenset()
        if response.status_code == 200:
            return frozenset(remaining)
        if response.status_code not in (400, 422):
            log.warning("probing the engine's sampling fields got %d; assuming it takes none of %s",
                        response.status_code, ", ".join(EXTENSIONS))
            return frozenset()
        named = {name for name in remaining if name in response.text}
        if not named:
            log.warning("the engine refused a request with %s without naming one (%s); sending none of them",
                        ", ".join(sorted(remaining)), response.text[:200])
            return frozenset()
        remaining -= named
    return frozenset(remaining)


def _probe_tokenize(client: httpx.Client, settings: RemoteSettings, model: str) -> bool:
    body = {"model": model, "add_generation_prompt": True, "messages": [{"role": "user", "content": "Hi"}]}
    try:
        response = client.post(settings.root + "/tokenize", json=body)
        return response.status_code == 200 and isinstance(response.json().get("count"), int)
    except (httpx.HTTPError, ValueError, AttributeError):
        return False
