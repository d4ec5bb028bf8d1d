"""One scheduler iteration's forward work: parts (a batch's decode step, a chunk, newcomers' prompts) and how they run.

Each part is a group of rows sharing a KV cache, with what to do with their
last-position logits and what to do when its pass fails. The parts of an
iteration run as one pass when the model allows it (engine/fused_forward.py),
else one forward pass each. A failed one-pass step is rolled back and rerun
part by part, so only a part that fails on its own fails; a part with a
`retry` (several newcomers prefilled together) is then split further, so only
a request that fails alone is failed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from engine.fused_forward import FusedForward, Group, rollback

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Part:
    group: Group
    done: Callable[[torch.Tensor], None]  # given the rows' last-position logits [B, V]
    failed: Callable[[Exception], None]  # its pass, or `done`, raised: fail its rows
    retry: Optional[Callable[[], list["Part"]]] = None  # smaller parts to run instead when its pass fails


def run_parts(parts: Sequence[Part], model, fused: Optional[FusedForward],
              late: Optional[Callable[[int, int], list[Part]]] = None) -> None:
    """Run the parts' forward work, in one pass where possible, and hand each part its logits in order.

    The order matters: decode parts come first, because a finished prompt is
    placed into a batch, which changes that batch's rows. In one pass, `late`
    is asked between layers for parts that arrived meanwhile (newcomers'
    prompts); they join the pass and come last.
    """
    if not parts:
        return
    if fused is not None:
        parts = list(parts)
        filled = [[layer.get_seq_length() for layer in p.group.cache.layers] for p in parts]

        def joining(index: int, layers: int) -> list[Group]:
            added = late(index, layers)
            for part in added:
                filled.append([layer.get_seq_length() for layer in part.group.cache.layers])
                parts.append(part)
            return [part.group for part in added]

        try:
            logits = fused([p.group for p in parts], joining if late is not None else None)
        except Exception as exc:
            log.warning("one-pass step failed (%r); running its parts one by one", exc)
            for part, before in zip(parts, filled):
                rollback(part.group.cache, before)
        else:
            for part, part_logits in zip(parts, logits):
                _finish(part, part_logits)
            return
    for part in parts:
        try:
            part_logits = forward_alone(model, part.group)
        except Exception as exc:
            if part.retry is not None:
                log.warning("a joint pass failed (%r); running its rows one by one", exc)
                run_parts(part.retry(), model, None)
            else:
                part.failed(exc)
            continue
        _finish(part, part_logits)


def forward_alone(model, group: Group) -> torch.Tensor:
    """The model's own forward over one group; only the last position's logits are computed."""
    out = model(input_ids=group.input_ids, attention_mask=group.attention_mask, position_ids=group.position_ids,
                past_key_values=group.cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1]


def _finish(part: Part, logits: torch.Tensor) -> None:
    try:
        part.done(logits)
    except Exception as exc:  # merging or sampling broke: these rows only
        part.failed(exc)
