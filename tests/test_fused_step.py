"""One forward pass per scheduler iteration computes what the model's own forward computes, group by group."""

from __future__ import annotations

import asyncio

import pytest
import torch

from engine.batch import RunningBatch, prefill_inputs
from engine.fused_forward import FusedForward, Group, decode_attention
from engine.kv_cache import GrowingCache
from engine.types import ChatMessage, SamplingParams

# runs the model in the test itself: in a thread that ends (conftest.py)
pytestmark = pytest.mark.torch_side_thread


class _Row:
    pass


def _prefill(model, tokenizer, texts, device, fused=None):
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    inputs = prefill_inputs(prompts, tokenizer.eos_token_id, device)
    cache = GrowingCache()
    if fused is None:
        logits = model(**inputs, past_key_values=cache, logits_to_keep=1).logits[:, -1]
    else:
        logits = fused([Group(inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"], cache)])[0]
    batch = RunningBatch()
    batch.add([_Row() for _ in prompts], cache, inputs["attention_mask"])
    return logits, batch


@torch.inference_mode()
def one_pass_against_forward(model, tokenizer, device="cpu") -> list[tuple[str, torch.Tensor, torch.Tensor, bool]]:
    """(what, the model's own logits, the one pass's logits, whether the pass held that group alone).

    A left-padded prefill of two prompts of different lengths, 12 decode steps over that batch, then one
    pass holding a decode step, a newcomer's prompt and the second half of a prompt read in two chunks.
    bench/fused_gpu_check.py reports the same comparison on a GPU.
    """
    fused = FusedForward(model)
    texts = ["The capital of France is", "Write a poem about the sea and the sky, with rhymes and feeling"]
    expected, theirs = _prefill(model, tokenizer, texts, device)
    got, ours = _prefill(model, tokenizer, texts, device, fused)
    pairs = [("prefill", expected, got, True)]
    tokens = expected.argmax(-1).tolist()
    for n in range(12):
        want = model(**theirs.step_inputs(tokens)).logits[:, -1]
        step = ours.step_inputs(tokens)
        have = fused([Group(step["input_ids"], step["attention_mask"], step["position_ids"], ours.cache)])[0]
        pairs.append((f"decode_{n}", want, have, True))
        tokens = want.argmax(-1).tolist()
    newcomer = tokenizer("Why is the sky blue?")["input_ids"]
    long_prompt = tokenizer("Describe a busy market in the morning, the stalls, the smells and the people.")["input_ids"]
    want_decode = model(**theirs.step_inputs(tokens)).logits[:, -1]
    new_inputs = prefill_inputs([newcomer], tokenizer.eos_token_id, device)
    want_new = model(**new_inputs, past_key_values=GrowingCache(), logits_to_keep=1).logits[:, -1]
    whole = torch.tensor([long_prompt], device=device)
    want_long = model(input_ids=whole, past_key_values=GrowingCache(), logits_to_keep=1).logits[:, -1]
    half = len(long_prompt) // 2
    chunk_cache = GrowingCache()
    model(input_ids=whole[:, :half], past_key_values=chunk_cache)
    step = ours.step_inputs(tokens)
    have_decode, have_long, have_new = fused([
        Group(step["input_ids"], step["attention_mask"], step["position_ids"], ours.cache),
        Group(whole[:, half:], torch.ones((1, len(long_prompt)), dtype=torch.long, device=device),
              torch.arange(half, len(long_prompt), device=device).unsqueeze(0), chunk_cache),
        Group(new_inputs["input_ids"], new_inputs["attention_mask"], new_inputs["position_ids"], GrowingCache()),
    ])
    return pairs + [("mixed_decode", want_decode, have_decode, False), ("mixed_newcomer", want_new, have_new, False),
                    ("mixed_chunk", want_long, have_long, False)]


def test_one_pass_matches_the_models_forward_alone_and_mixed(engine):
    pairs = one_pass_against_forward(engine._model, engine._tokenizer)
    assert [name for name, *_ in pairs][-3:] == ["mixed_decode", "mixed_newcomer", "mixed_chunk"]
    for name, want, have, alone in pairs:
        # the model's own forward multiplies by q, k, v, gate and up one by one, the pass by joined and packed
        # copies (engine/joined_projections.py), decode steps attend with two plain products instead of sdpa's
        # kernel, and mixed passes run the products over more rows at once: the last bits differ, the choices do not
        assert torch.allclose(want, have, atol=2e-4), (name, (want - have).abs().max())  # measured: <= 8e-5 on ~30
        assert torch.equal(want.argmax(-1), have.argmax(-1)), name


@pytest.mark.parametrize("layer", [1, 7, 15])
def test_a_prompt_joining_a_pass_partway_gets_what_it_would_from_the_start(engine, layer):
    model, tokenizer = engine._model, engine._tokenizer
    fused = FusedForward(model)
    texts = ["The capital of France is", "Write a poem about the sea and the sky, with rhymes and feeling"]
    newcomer = prefill_inputs([tokenizer(t)["input_ids"] for t in ["Why is the sky blue?", "Name a fruit."]],
                              tokenizer.eos_token_id, "cpu")
    results = []
    with torch.inference_mode():
        for late in (False, True):
            logits, batch = _prefill(model, tokenizer, texts, "cpu", fused)
            step = batch.step_inputs(logits.argmax(-1).tolist())
            decode = Group(step["input_ids"], step["attention_mask"], step["position_ids"], batch.cache)
            new = Group(newcomer["input_ids"], newcomer["attention_mask"], newcomer["position_ids"], GrowingCache())
            asked = []

            def joining(index, layers):
                asked.append((index, layers))
                return [new] if index == layer else []

            out = fused([decode], joining) if late else fused([decode, new])
            results.append((out, new.cache, batch.cache))
            if late:
                layers = len(model.model.layers)
                assert asked == [(i, layers) for i in range(1, layers)]  # asked before every layer but the first
    (want, want_new, want_decode), (have, have_new, have_decode) = results
    assert len(have) == 2
    for w, h in zip(want, have):
        assert torch.allclose(w, h, atol=2e-4), (w - h).abs().max()
        assert torch.equal(w.argmax(-1), h.argmax(-1))
    for want_cache, have_cache in ((want_new, have_new), (want_decode, have_decode)):
        assert len(want_cache.layers) == len(have_cache.layers) == len(model.model.layers)
        for a, b in zip(want_cache.layers, have_cache.layers):
            assert a.get_seq_length() == b.get_seq_length()
            assert torch.allclose(a.keys[..., :a.get_seq_length(), :], b.keys[..., :b.get_seq_length(), :], atol=1e-4)


def test_decode_attention_matches_sdpa_with_grouped_heads_and_padding():
    torch.manual_seed(0)
    rows, heads, kv_heads, keys, dim = 5, 9, 3, 37, 64
    query = torch.randn(rows, heads, 1, dim)
    key, value = torch.randn(rows, kv_heads, keys, dim), torch.randn(rows, kv_heads, keys, dim)
    allowed = torch.ones(rows, 1, 1, keys, dtype=torch.bool)
    allowed[1, ..., :20] = False  # a left-padded row
    allowed[3, ..., :36] = False  # a row that sees only its newest key
    mask = torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf"))
    want = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(3, 1), value.repeat_interleave(3, 1), attn_mask=mask, scale=0.125)
    have = decode_attention(query, key, value, mask, 0.125)
    assert have.shape == (rows, 1, heads, dim)
    assert torch.allclose(have, want.transpose(1, 2), atol=1e-5)
    assert torch.allclose(have[3, 0], value[3, :, -1].repeat_interleave(3, 0), atol=1e-6)  # all weight on one key


async def _answer(engine, question: str, params: SamplingParams, delay: float) -> str:
    """The whole answer to one question, asked after `delay` seconds."""
    await asyncio.sleep(delay)
    text = ""
    async for chunk in engine.generate([ChatMessage("user", question)], params, f"ask-{delay}-{question}"):
        text += chunk.delta
    return text


def test_the_embedded_model_runs_one_pass_steps_and_answers_alike_when_requests_overlap(engine):
    assert engine.health()["one_pass_steps"] is True
    questions = ["What is the capital of France?", "Name three primary colors.", "What is 2 plus 2?",
                 "Which planet is known as the red planet?"]
    greedy = SamplingParams(max_new_tokens=24, temperature=0)

    def ask(question: str, delay: float):
        return _answer(engine, question, greedy, delay)

    async def alone() -> list[str]:
        return [await ask(q, 0) for q in questions]

    async def overlapping() -> list[str]:
        # staggered, so prompts are read in the same passes as other requests' decode steps
        return await asyncio.gather(*(ask(q, 0.15 * i) for i, q in enumerate(questions)))

    by_itself = asyncio.run(alone())
    together = asyncio.run(overlapping())
    assert "Paris" in by_itself[0]
    assert sum(a == b for a, b in zip(by_itself, together)) >= 3, (by_itself, together)


def test_requests_arriving_during_a_pass_join_it_and_answer_as_they_do_alone(engine):
    questions = ["What is the capital of France?", "Name three primary colors.", "What is 2 plus 2?",
                 "Which planet is known as the red planet?", "Name a fruit.", "What colour is the sky?",
                 "Who wrote Hamlet?", "What is the boiling point of water?", "Name a large animal.",
                 "What is the opposite of hot?", "How many days are in a week?", "Name a musical instrument."]
    greedy = SamplingParams(max_new_tokens=12, temperature=0)

    def ask(question: str, delay: float, params: SamplingParams = greedy):
        return _answer(engine, question, params, delay)

    async def alone() -> list[str]:
        return [await ask(q, 0) for q in questions]

    async def arriving_while_one_decodes() -> list[str]:
        long = asyncio.ensure_future(ask("Write a long story about a dragon.", 0, SamplingParams(max_new_tokens=400,
                                                                                                   temperature=0)))
        # arrival times unrelated to the pass length: about half land in a pass's first half, where they join it
        answers = await asyncio.gather(*(ask(q, 0.3 + 0.23 * i) for i, q in enumerate(questions)))
        long.cancel()
        return answers

    by_itself = asyncio.run(alone())
    before = engine.health()["joined_mid_pass"]
    together = asyncio.run(arriving_while_one_decodes())
    assert engine.health()["joined_mid_pass"] > before
    assert sum(a == b for a, b in zip(by_itself, together)) >= len(questions) - 2, (by_itself, together)


@pytest.mark.parametrize("depth", [-0.1, 1.5, float("nan")])
def test_a_join_depth_outside_0_to_1_is_refused_before_the_model_loads(depth):
    from engine.config import EngineConfig
    from engine.factory import _build_transformers
    from engine.loader import ModelSource
    from engine.types import ModelLoadError

    # a source that cannot load: the setting must be refused first
    with pytest.raises(ModelLoadError, match="--join-mid-pass must be between 0 and 1"):
        _build_transformers(EngineConfig(join_mid_pass=depth), ModelSource("/nonexistent", None, "nothing"))
