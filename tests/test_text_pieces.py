"""Pure pieces of the engine: sampling filters and the incremental detokenizer."""

import pytest
import torch

from engine.detokenizer import IncrementalDetokenizer
from engine.sampling import NUCLEUS_PROBE, apply_repetition_penalty, candidates, draw, filter_top_k_top_p, make_generator, sample_batch
from engine.types import SamplingParams


def _filter(row, k, p):
    return filter_top_k_top_p(row.unsqueeze(0), torch.tensor([k]), torch.tensor([p]))[0]


def test_top_k_keeps_only_k_best():
    out = _filter(torch.tensor([1.0, 5.0, 3.0, 4.0]), 2, 1.0)
    assert torch.isfinite(out).tolist() == [False, True, False, True]


def test_top_p_keeps_smallest_nucleus_and_always_the_best():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.isfinite(_filter(logits, 0, 0.7)).tolist() == [True, True, False, False]
    assert torch.isfinite(_filter(logits, 0, 0.01)).tolist() == [True, False, False, False]


def test_rows_keep_their_own_limits():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]]))
    out = filter_top_k_top_p(logits, torch.tensor([1, 0]), torch.tensor([1.0, 0.9]))
    assert torch.isfinite(out).tolist() == [[True, False, False, False], [True, True, True, False]]


def test_repetition_penalty_lowers_seen_tokens_both_signs():
    logits = torch.tensor([2.0, -2.0, 2.0])
    out = apply_repetition_penalty(logits, torch.tensor([0, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, 2.0]


def test_batch_rows_use_their_own_sampling_settings():
    row = torch.tensor([0.1, 3.0, 0.2, 2.9])
    logits = torch.stack([row, row, row])
    settings = [SamplingParams(do_sample=False), SamplingParams(temperature=1.5, top_k=2, top_p=1.0),
                SamplingParams(temperature=1.5, top_k=0, top_p=1.0)]

    def draw(seed):
        gens = [make_generator(seed) for _ in settings]
        return [sample_batch(logits, settings, gens) for _ in range(40)]

    runs = draw(7)
    assert all(r[0] == 1 for r in runs)  # greedy row: always the argmax
    assert {r[1] for r in runs} == {1, 3}  # top-k 2 row: only the two best, both drawn
    assert len({r[2] for r in runs}) > 2  # unrestricted row: the whole vocabulary
    assert draw(7) == runs  # the same seeds give the same draws


def test_candidate_search_matches_the_full_sort():
    torch.manual_seed(0)
    vocab = 8 * NUCLEUS_PROBE
    sharp = torch.randn(4, vocab) * 6  # nucleus inside the first probe
    flat = torch.randn(4, vocab) * 0.5  # nucleus wider than the probes: the full-sort fallback
    rows = torch.cat([sharp, flat])
    top_k = torch.tensor([0, 0, 40, 5, 0, 0, 3000, 0])
    top_p = torch.tensor([0.95, 0.5, 0.9, 1.0, 0.95, 0.999, 0.8, 0.2])
    reference = filter_top_k_top_p(rows, top_k, top_p)
    blocks = candidates(rows, top_k, top_p)
    assert sorted(i for b in blocks for i in b.rows) == list(range(8))  # every row exactly once
    widths = {}
    for block in blocks:
        for j, i in enumerate(block.rows):
            widths[i] = block.ids.shape[1]
            kept = block.probs[j] > 0
            allowed = torch.nonzero(torch.isfinite(reference[i])).flatten()
            assert sorted(block.ids[j][kept].tolist()) == sorted(allowed.tolist()), f"row {i}"
            share = block.probs[j][kept] / block.probs[j].sum()
            assert torch.allclose(share, reference[i].softmax(-1)[block.ids[j][kept]], atol=1e-6)
    assert widths[5] == vocab  # the 0.999 nucleus of a flat row: the full sort really ran
    assert widths[0] < vocab  # a sharp row was settled without it


def test_a_draw_lands_on_allowed_tokens_in_proportion():
    probs = torch.tensor([[0.5, 0.0, 0.25, 0.25, 0.0]] * 4000)
    picked = draw(probs, torch.rand(4000, generator=torch.Generator().manual_seed(3)))
    counts = torch.bincount(picked, minlength=5).tolist()
    assert counts[1] == counts[4] == 0  # never a zero-weight position, nor past the last allowed one
    assert abs(counts[0] / 4000 - 0.5) < 0.03 and abs(counts[2] / 4000 - 0.25) < 0.03
    assert draw(probs[:1], torch.tensor([0.0])).item() == 0 and draw(probs[:1], torch.tensor([0.9999])).item() == 3
    with pytest.raises(ValueError):
        draw(torch.tensor([[float("nan"), 1.0]]), torch.tensor([0.5]))


def test_top_p_after_top_k_is_measured_over_the_rows_own_k():
    # [0.4, 0.3, 0.2, 0.1]: with k=2 the two survivors weigh 0.57/0.43, so p=0.5 keeps one
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.4, 0.3, 0.2, 0.1]]))
    out = filter_top_k_top_p(logits, torch.tensor([2, 0]), torch.tensor([0.5, 0.5]))
    assert torch.isfinite(out).tolist() == [[True, False, False, False], [True, True, False, False]]


def test_a_seeded_draw_does_not_depend_on_its_batch_neighbours():
    torch.manual_seed(1)
    row = torch.randn(5000) * 3
    mine = SamplingParams(temperature=1.0, top_k=20, top_p=0.9, seed=5)
    neighbour = SamplingParams(temperature=1.0, top_k=0, top_p=0.95)
    gens = [make_generator(5), make_generator(9)]
    draws_alone, draws_together = [], []
    g_alone = make_generator(5)
    for _ in range(30):
        draws_alone.append(sample_batch(row.unsqueeze(0), [mine], [g_alone])[0])
        draws_together.append(sample_batch(torch.stack([row, torch.randn(5000)]), [mine, neighbour], gens)[0])
    assert draws_alone == draws_together
    assert len(set(draws_alone)) > 1


class _CharTokenizer:
    """One token per character: enough to drive the detokenizer's logic."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def _feed(text, stop):
    dt = IncrementalDetokenizer(_CharTokenizer(), stop)
    pieces = []
    for ch in text:
        pieces.append(dt.push(ord(ch)))
        if dt.stopped:
            break
    if not dt.stopped:
        pieces.append(dt.flush())
    return pieces, dt.stopped


def test_stop_string_cuts_the_answer_and_is_never_shown():
    pieces, stopped = _feed("hello\nUser: more", ["\nUser:"])
    assert stopped and "".join(pieces) == "hello"
    assert not any("\n" in p for p in pieces)  # the held-back prefix was never released


def test_text_that_only_looks_like_a_stop_prefix_is_released_later():
    pieces, stopped = _feed("a\nUs is fine", ["\nUser:"])
    assert not stopped and "".join(pieces) == "a\nUs is fine"


@pytest.mark.parametrize("text", ["plain", "中文字符测试", "emoji 🎉 ok"])
def test_detokenizer_round_trips_real_tokenizer(engine, text):
    tokenizer = engine._tokenizer
    ids = tokenizer(text, add_special_tokens=False).input_ids
    dt = IncrementalDetokenizer(tokenizer, [])
    assert "".join(dt.push(i) for i in ids) + dt.flush() == text
