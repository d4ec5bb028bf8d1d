"""One request's bad numbers or bad data fail that request only: the batch and every other user go on."""

from __future__ import annotations

import asyncio
import logging

import torch

from engine import ChatMessage, EngineError, SamplingParams
from engine.sampling import make_generator, sample_batch

GREEDY = SamplingParams(max_new_tokens=20, do_sample=False)

# settings the API refuses, sent straight to the engine as a bug or a new surface might
POISONS = {
    "huge top_k": SamplingParams(max_new_tokens=8, top_k=10**20, temperature=0.7),
    "tiny temperature": SamplingParams(max_new_tokens=8, temperature=1e-300, top_p=0.9),
    "tiny repetition penalty": SamplingParams(max_new_tokens=8, repetition_penalty=1e-300, temperature=1.0),
    "NaN top_p": SamplingParams(max_new_tokens=8, top_p=float("nan"), temperature=1.0),
    "infinite temperature": SamplingParams(max_new_tokens=8, temperature=float("inf"), top_k=5),
    "seed past 2**64": SamplingParams(max_new_tokens=8, seed=2**70),
    "stop string of the wrong type": SamplingParams(max_new_tokens=8, stop=(5,)),  # type: ignore[arg-type]
}


async def _answer(engine, prompt: str, params: SamplingParams, request_id: str) -> str:
    text = ""
    async for chunk in engine.generate([ChatMessage("user", prompt)], params, request_id):
        text += chunk.delta
    return text


async def test_poisoned_requests_fail_alone_beside_normal_ones(engine):
    prompts = ["What is the capital of France?", "Name three colors.", "What is 2 + 2?"]
    solo = [await _answer(engine, p, GREEDY, f"solo-{i}") for i, p in enumerate(prompts)]
    failed_before = engine.health()["failed"]
    # all submitted at once, so they are prefilled and decoded in the same batch
    normal = [_answer(engine, p, GREEDY, f"normal-{i}") for i, p in enumerate(prompts)]
    poisoned = [_answer(engine, "Tell me a story.", params, f"poison-{name}") for name, params in POISONS.items()]
    results = await asyncio.gather(*normal, *poisoned, return_exceptions=True)

    assert results[:len(prompts)] == solo  # untouched by their neighbours
    outcomes = dict(zip(POISONS, results[len(prompts):]))
    for name, outcome in outcomes.items():
        assert isinstance(outcome, (str, EngineError)), f"{name}: {outcome!r}"
        if isinstance(outcome, EngineError):
            assert "other requests are not affected" in str(outcome)
    # the wrong-typed stop string cannot be matched: that request fails, visibly
    assert isinstance(outcomes["stop string of the wrong type"], EngineError)
    assert engine.health()["failed"] > failed_before
    # and the engine keeps serving
    assert await _answer(engine, prompts[0], GREEDY, "after") == solo[0]


def test_a_row_that_breaks_sampling_gets_its_own_error():
    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 3
    before = logits.clone()
    params = [SamplingParams(temperature=0.8, top_k=10), SamplingParams(repetition_penalty=1e-300, temperature=1.0),
              SamplingParams(do_sample=False)]
    seen = [None, torch.arange(50), None]
    tokens = sample_batch(logits, params, [make_generator(1), make_generator(2), make_generator(3)], seen)
    assert isinstance(tokens[0], int) and 0 <= tokens[0] < 50
    assert isinstance(tokens[1], Exception)
    assert tokens[2] == int(before[2].argmax())
    assert torch.equal(logits, before)  # penalties never write into the caller's logits


def test_a_top_p_too_small_for_float32_still_keeps_the_best_token():
    """Found by fuzzing: top_p=5e-324 is valid (> 0) but rounds to 0 in float32, which dropped every token."""
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    for top_k in (0, 2):
        tokens = sample_batch(logits, [SamplingParams(top_p=5e-324, top_k=top_k, temperature=1.0)], [make_generator(0)])
        assert tokens == [1]


async def test_a_forward_pass_that_fails_for_one_request_fails_that_request_only(engine, monkeypatch, caplog):
    """A pass that raises on one request's tokens (as a kernel may on odd input): the one-pass step is rolled
    back and rerun part by part, a joint prefill one request at a time; the running stream and the
    newcomers beside it answer exactly as alone."""
    tokenizer = engine._tokenizer
    prompts = ["What is the capital of France?", "Name three colors.", "What is 2 + 2?"]
    poison = tokenizer.encode("⁂", add_special_tokens=False)[-1]
    assert all(poison not in tokenizer.encode(p) for p in prompts + ["Tell me a story."])
    long_params = SamplingParams(max_new_tokens=60, do_sample=False)
    solo = [await _answer(engine, p, GREEDY, f"fwd-solo-{i}") for i, p in enumerate(prompts)]
    solo_long = await _answer(engine, "Tell me a story.", long_params, "fwd-solo-long")

    embed = engine._model.model.embed_tokens
    original = embed.forward

    def failing_on_poison(input_ids):
        if bool((input_ids == poison).any()):
            raise RuntimeError("injected failure")
        return original(input_ids)

    monkeypatch.setattr(embed, "forward", failing_on_poison)
    with caplog.at_level(logging.DEBUG, logger="engine"):
        running = asyncio.ensure_future(_answer(engine, "Tell me a story.", long_params, "fwd-long"))
        while engine.health()["running"] == 0:  # newcomers join while it decodes
            await asyncio.sleep(0.01)
        newcomers = [_answer(engine, p, GREEDY, f"fwd-normal-{i}") for i, p in enumerate(prompts)]
        poisoned = [_answer(engine, f"Say ⁂ {i}", GREEDY, f"fwd-poison-{i}") for i in range(3)]
        results = await asyncio.gather(*newcomers, *poisoned, return_exceptions=True)
        story = await running

    assert results[:3] == solo and story == solo_long
    assert all(isinstance(r, EngineError) and "other requests are not affected" in str(r) for r in results[3:]), results
    assert "one-pass step failed" in caplog.text
    joint = [r.args[1] for r in caplog.records if r.msg.startswith("admitting") and r.args[0] > 1]
    if any("fwd-poison" in ids for ids in joint):  # a poisoned prompt was read together with others
        assert "a joint pass failed" in caplog.text
    assert await _answer(engine, prompts[0], GREEDY, "fwd-after") == solo[0]
