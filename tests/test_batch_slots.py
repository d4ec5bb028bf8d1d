"""A finished row's slot is taken by a newcomer in place, and the batch's rows still decode as they would alone."""

from __future__ import annotations

import pytest
import torch

from engine.batch import RunningBatch, prefill_inputs
from engine.kv_cache import GrowingCache

# runs the model in the test itself: in a thread that ends (conftest.py)
pytestmark = pytest.mark.torch_side_thread


class _Row:
    def __init__(self, name: str) -> None:
        self.name = name


def _prefilled(model, tokenizer, texts: list[str]) -> tuple[RunningBatch, torch.Tensor]:
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    inputs = prefill_inputs(prompts, tokenizer.eos_token_id, "cpu")
    cache = GrowingCache()
    logits = model(**inputs, past_key_values=cache, logits_to_keep=1).logits[:, -1]
    batch = RunningBatch()
    batch.add([_Row(t) for t in texts], cache, inputs["attention_mask"])
    return batch, logits


def _decode(model, batch: RunningBatch, tokens: list[int]) -> torch.Tensor:
    return model(**batch.step_inputs(tokens)).logits[:, -1]


@torch.inference_mode()
def test_a_newcomer_takes_a_free_slot_without_a_copy_and_decodes_as_alone(engine):
    model, tokenizer = engine._model, engine._tokenizer
    texts = ["The capital of France is", "Write a poem about the sea and the sky, with rhymes and feeling",
             "Three primary colors are"]
    batch, logits = _prefilled(model, tokenizer, texts)
    others, _ = _prefilled(model, tokenizer, [texts[0], texts[2]])  # the rows that stay, as a batch of their own
    tokens = logits.argmax(-1).tolist()
    for _ in range(6):
        _decode(model, others, [tokens[0], tokens[2]])
        tokens = _decode(model, batch, tokens).argmax(-1).tolist()
    batch.release([1])
    assert [r.name if r else None for r in batch.slots] == [texts[0], None, texts[2]] and len(batch) == 2
    # a free slot's old keys may hold anything: NaN there must not reach its next owner
    for layer in batch.cache.layers:
        layer.keys[1].fill_(float("nan"))
        layer.values[1].fill_(float("nan"))

    newcomer = "Why is the sky blue?"
    fresh, fresh_logits = _prefilled(model, tokenizer, [newcomer])
    alone, _ = _prefilled(model, tokenizer, [newcomer])
    buffer = batch.cache.layers[0]._keys.data_ptr()
    assert batch.can_fill(1, fresh.width)
    batch.add(fresh.slots, fresh.cache, fresh.mask)
    assert batch.cache.layers[0]._keys.data_ptr() == buffer  # written in place, not copied
    assert [r.name for r in batch.rows] == [texts[0], newcomer, texts[2]]

    feed = [tokens[0], int(fresh_logits.argmax()), tokens[2]]
    for step in range(8):
        got = _decode(model, batch, feed)
        want_new = _decode(model, alone, [feed[1]])
        want_others = _decode(model, others, [feed[0], feed[2]])
        assert torch.isfinite(got).all(), step
        assert torch.allclose(got[1], want_new[0], atol=1e-4), (step, (got[1] - want_new[0]).abs().max())
        assert torch.allclose(got[[0, 2]], want_others, atol=1e-4), (step, (got[[0, 2]] - want_others).abs().max())
        assert torch.equal(got.argmax(-1), torch.stack([want_others[0], want_new[0], want_others[1]]).argmax(-1))
        feed = got.argmax(-1).tolist()


@torch.inference_mode()
def test_free_slots_are_dropped_with_one_copy_when_most_are_free(engine):
    model, tokenizer = engine._model, engine._tokenizer
    texts = ["Hello", "Write a poem about the sea and the sky, with rhymes and feeling", "Name a color", "Hi there"]
    batch, logits = _prefilled(model, tokenizer, texts)
    tokens = logits.argmax(-1).tolist()
    tokens = _decode(model, batch, tokens).argmax(-1).tolist()
    wide = batch.width
    batch.release([1])
    batch.tidy()
    assert len(batch.slots) == 4  # one free slot of four: kept for the next newcomer
    batch.release([2])
    batch.tidy()  # two free of four is not more than live: still kept
    assert len(batch.slots) == 4
    batch.release([0])
    batch.tidy()  # three free, one live: one copy of the live row
    assert [r.name for r in batch.slots] == ["Hi there"]
    # the long row's columns went with it: only what the short row uses is kept
    assert batch.width < wide and bool(batch.mask.all())
    alone, alone_logits = _prefilled(model, tokenizer, ["Hi there"])
    step_alone = _decode(model, alone, alone_logits.argmax(-1).tolist())
    got = _decode(model, batch, [tokens[3]])
    want = _decode(model, alone, step_alone.argmax(-1).tolist())
    assert torch.allclose(got, want, atol=1e-4)
    batch.release([0])
    assert not batch and batch.cache is None
