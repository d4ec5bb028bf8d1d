"""One forward pass for a whole scheduler iteration: every batch's decode step, newcomers' prompts and a chunk.

On a CPU a forward pass costs ~40 ms before its first token, reading the
weights (540 MB in fp32 for the embedded model), and the runner used to pay
it once per batch, once for the newcomers' prefill and once for a chunk of a
long prompt. Only attention needs each group's own rows, masks and cache;
the projections, norms and MLP treat tokens one by one. So here every
group's tokens go through those as one matrix (one read of the weights) and
attention runs per group: an 8-row decode step plus a 15-token prefill went
from 113 to 70 ms of matrix products on two cores (bench/README.md).

A request that arrives while a pass runs can join it between layers
(`late`): its prompt is brought through the layers already done on its own,
then it goes on with everyone else, instead of waiting for the pass to end
and then for a whole pass of its own.

Written for the Llama layout (llama, mistral without sliding windows,
qwen2): the same modules and attention function the model's own forward
uses; other architectures keep their own forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from engine.layer_ops import LayerOps, layer_ops

SUPPORTED = {"llama", "mistral", "qwen2"}


@dataclass
class Group:
    """Rows that share a KV cache: `input_ids`/`position_ids` [B, L], `attention_mask` [B, past + L]."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    cache: object  # a transformers Cache (GrowingCache)


#: asked between layers with (index, layer count): groups to bring into the pass from that layer on
LateJoin = Callable[[int, int], Sequence["Group"]]


def fusable(model) -> bool:
    config = model.config
    if getattr(config, "model_type", None) not in SUPPORTED:
        return False
    if getattr(config, "use_sliding_window", False) or (
            config.model_type == "mistral" and getattr(config, "sliding_window", None) is not None):
        return False
    body = getattr(model, "model", None)
    layers = getattr(body, "layers", None)
    if layers is None or not hasattr(body, "rotary_emb") or not hasattr(body, "embed_tokens"):
        return False
    needed = ("input_layernorm", "post_attention_layernorm", "mlp", "self_attn")
    return all(all(hasattr(layer, name) for name in needed) for layer in layers) and \
        all(hasattr(layer.self_attn, p) for layer in layers for p in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "head_dim"))


class FusedForward:
    """The model's forward, run over several groups at once; returns each group's last-position logits [B, V]."""

    def __init__(self, model, decode_products: bool = True) -> None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        from transformers.models.llama.modeling_llama import eager_attention_forward

        self._model = model
        self._attention = ALL_ATTENTION_FUNCTIONS.get_interface(model.config._attn_implementation, eager_attention_forward)
        self._ops = [layer_ops(layer) for layer in model.model.layers]
        # one-position groups on a CPU attend with two plain products (decode_attention); False: the model's own
        self._decode_products = decode_products

    @torch.inference_mode()
    def __call__(self, groups: Sequence[Group], late: Optional[LateJoin] = None) -> list[torch.Tensor]:
        """`late(index, layers)`, asked before each layer after the first, may return more groups (newcomers'
        prompts): they are brought through the layers before `index` on their own, then go on in this pass."""
        body = self._model.model
        groups = list(groups)
        state = self._start(groups)
        layers = len(body.layers)
        for index, layer in enumerate(body.layers):
            if late is not None and index:
                newcomers = list(late(index, layers))
                if newcomers:
                    caught_up = self._start(newcomers)
                    for before, earlier in enumerate(body.layers[:index]):
                        self._layer(earlier, before, newcomers, caught_up)
                    state.extend(caught_up)
                    groups += newcomers
            self._layer(layer, index, groups, state)
        # only each row's last position needs the vocabulary projection
        last, start = [], 0
        for rows, length in state.shapes:
            last.append(torch.arange(rows, device=state.hidden.device) * length + start + length - 1)
            start += rows * length
        logits = self._model.lm_head(body.norm(state.hidden[torch.cat(last)]))
        out, start = [], 0
        for rows, _ in state.shapes:
            out.append(logits[start:start + rows])
            start += rows
        return out

    def _start(self, groups: Sequence[Group]) -> "_PassState":
        body = self._model.model
        embedded = [body.embed_tokens(g.input_ids) for g in groups]
        rotary = [body.rotary_emb(e, g.position_ids) for e, g in zip(embedded, groups)]
        sin = torch.cat([s.reshape(-1, s.shape[-1]) for _, s in rotary]).unsqueeze(1)
        half = sin.shape[-1] // 2
        return _PassState(
            hidden=torch.cat([e.reshape(-1, e.shape[-1]) for e in embedded]),
            shapes=[tuple(g.input_ids.shape) for g in groups],
            # per token [N, 1, head_dim]: every group's positions are rotated in one go
            cos=torch.cat([c.reshape(-1, c.shape[-1]) for c, _ in rotary]).unsqueeze(1),
            sin_signed=torch.cat((-sin[..., :half], sin[..., half:]), -1),
            # made additive once per pass: sdpa would otherwise turn a boolean mask into one in every layer
            masks=[_additive(_attention_mask(g), embedded[0].dtype) for g in groups])

    def _layer(self, layer, index: int, groups: Sequence[Group], state: "_PassState") -> None:
        ops: LayerOps = self._ops[index]
        hidden = state.hidden
        x = ops.norm_in(hidden)
        tokens, dim = x.shape[0], ops.head_dim
        if ops.qkv is not None:  # engine/joined_projections.py: q and k rotate as one tensor
            qkv = ops.qkv(x)
            width = (ops.q_heads + ops.kv_heads) * dim
            qk = _rotated(qkv[:, :width].view(tokens, -1, dim), state.cos, state.sin_signed)
            q, k = qk.split([ops.q_heads, ops.kv_heads], 1)
            v = qkv[:, width:].view(tokens, -1, dim)
        else:
            q = _rotated(ops.q(x).view(tokens, -1, dim), state.cos, state.sin_signed)
            k = _rotated(ops.k(x).view(tokens, -1, dim), state.cos, state.sin_signed)
            v = ops.v(x).view(tokens, -1, dim)
        outputs, start = [], 0
        for group, (rows, length), mask in zip(groups, state.shapes, state.masks):
            end = start + rows * length
            if length == 1 and self._decode_products and q.device.type == "cpu":
                # [rows, heads, dim] is already [rows, heads, 1, dim] in memory
                kg, vg = group.cache.update(k[start:end].unsqueeze(2), v[start:end].unsqueeze(2), index)
                out = decode_attention(q[start:end].unsqueeze(2), kg, vg, mask, ops.scaling)
            else:
                qg = q[start:end].view(rows, length, -1, dim).transpose(1, 2)
                kg = k[start:end].view(rows, length, -1, dim).transpose(1, 2)
                vg = v[start:end].view(rows, length, -1, dim).transpose(1, 2)
                kg, vg = group.cache.update(kg, vg, index)
                out, _ = self._attention(layer.self_attn, qg, kg, vg, mask, dropout=0.0, scaling=ops.scaling)
            outputs.append(out.reshape(rows * length, -1))
            start = end
        # the products' outputs are fresh tensors, so the residual adds can land in them
        hidden = ops.o(outputs[0] if len(outputs) == 1 else torch.cat(outputs)).add_(hidden)
        x = ops.norm_post(hidden)
        if ops.gate_up is not None:
            gate, up = ops.gate_up(x).chunk(2, -1)
            state.hidden = ops.down(ops.act(gate).mul_(up)).add_(hidden)
        else:
            state.hidden = ops.mlp(x).add_(hidden)


@dataclass
class _PassState:
    """What a pass carries from layer to layer: every group's tokens as one matrix with their rotary
    tables, and per group its shape and additive mask."""

    hidden: torch.Tensor
    shapes: list
    cos: torch.Tensor
    sin_signed: torch.Tensor  # sin with its first half negated: see _rotated
    masks: list

    def extend(self, other: "_PassState") -> None:
        self.hidden = torch.cat([self.hidden, other.hidden])
        self.cos = torch.cat([self.cos, other.cos])
        self.sin_signed = torch.cat([self.sin_signed, other.sin_signed])
        self.shapes += other.shapes
        self.masks += other.masks


def _rotated(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of [tokens, heads, dim] by per-token cos/sin [tokens, 1, dim].

    transformers' Llama `apply_rotary_pos_emb` computes x*cos + cat(-x2, x1)*sin
    in seven operations. cat(x2, x1) is `roll`, and moving the minus onto sin
    (`sin_signed`, made once per pass) gives the same products, since IEEE
    multiplication is symmetric in sign: four operations, bit-identical.
    """
    return (x * cos).add_(x.roll(x.shape[-1] // 2, -1).mul_(sin_signed))


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                     scaling: float) -> torch.Tensor:
    """One query position per row, on a CPU: [B, H, 1, D] against the cache's [B, KV, T, D] -> [B, 1, H, D].

    torch's flash kernel for CPU is built for long queries; with one it took
    ~1 ms a layer at 32 rows of 180 keys in a whole step, two plain products
    and a softmax ~0.68 (bench/README.md, "Round 7"). Each key
    head's query heads are one matrix, so the keys are not repeated per head.
    """
    rows, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    grouped = query.reshape(rows, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(grouped, key.transpose(-1, -2)).mul_(scaling).add_(mask)  # mask [B, 1, 1, T]
    return torch.matmul(scores.softmax(-1), value).reshape(rows, 1, heads, dim)


def _attention_mask(group: Group) -> torch.Tensor:
    """[B, 1, L, past + L] booleans (True = may attend): causal over the cache, padding hidden.

    A padding query position sees nothing else, so it is let see itself: a row of
    all False would make attention NaN, and NaN keys in padding slots would
    poison the rows that later skip them (0 x NaN).
    """
    rows, length = group.input_ids.shape
    total = group.attention_mask.shape[1]
    past = total - length
    device = group.attention_mask.device
    keys = torch.arange(total, device=device)
    queries = torch.arange(length, device=device) + past
    causal = keys.unsqueeze(0) <= queries.unsqueeze(1)  # [L, total]
    allowed = causal.unsqueeze(0) & group.attention_mask.bool().unsqueeze(1)  # [B, L, total]
    allowed |= (keys.unsqueeze(0) == queries.unsqueeze(1)).unsqueeze(0)
    return allowed.unsqueeze(1)


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def rollback(cache, filled: list[int]) -> None:
    """Forget what a failed pass appended to `cache`: back to `filled` tokens per layer (layers the pass
    created, past the end of `filled`, back to none)."""
    for i, layer in enumerate(cache.layers):
        layer.truncate(filled[i] if i < len(filled) else 0)
