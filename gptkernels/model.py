"""The GPT family (GPT-1, GPT-2, GPT-3-style) on one GPT class whose blocks run on gptkernels: fused residual +
LayerNorm, fused attention (dense or banded), fused MLP.

    h = wte(idx) + wpe(pos)                                   # (B, T, C) residual stream, learned positions
    pre-norm block (GPT-2, GPT-3):
                a    = attn(ln_1(h))                          # causal self-attention, c_attn -> SDPA -> c_proj
                m, h = ln_2(a, residual=h)                    # h += a and LayerNorm in one kernel
                h    = mlp(m, residual=h)                     # h += c_proj(gelu(c_fc(m))), residual in the epilogue
    post-norm block (GPT-1, config.norm = "post"):
                n, _ = ln_1(attn(h), residual=h)              # n = LN(h + attn(h)), one kernel
                h, _ = ln_2(mlp(n), residual=n)               # h = LN(n + mlp(n)), one kernel
    logits = lm_head(ln_f(h))                                 # lm_head tied to wte; no ln_f when not final_norm

Attention per layer (config.attention_layers, repeated over the layers): "global" is dense causal, "local" a causal
band of config.window_size keys (query i sees keys i - window_size < j <= i), the ``window`` of the attention ops:
GPT-3's alternating dense and locally banded layers, and GPT-Neo's pattern.

GPT(config, backend="torch") runs the same module tree on the eager PyTorch references of every op: the reference
model that tests and the profiler compare against. Parameter names follow nanoGPT (transformer.wte, .h.N.attn.c_attn,
...), so nanoGPT checkpoints load as they are; :meth:`GPT.from_hf` converts Hugging Face OpenAIGPT (GPT-1), GPT-2
and GPT-Neo weights.

Packed batches: ``GPT.forward(idx, cu_seqlens=..., max_seqlen=...)`` treats the B*T tokens of idx as documents laid
end to end (cu_seqlens holds their start offsets in the flattened tokens); attention runs through
``flash_attn_varlen_func``, causal within each document and never across two, and positions restart at 0 at every
document start. Such batches need no padding tokens.

Inference uses a :class:`KVCache`: the prompt is prefilled with the fused attention, then each new token attends to
the cache with ``decode_attention``. A decode step reads its position from a device tensor and writes the cache in
place, so it has static shapes and can be captured in a CUDA graph. A local layer's one-token step gathers the
window_size keys of its band (positions computed on the device, :meth:`KVCache.band`), so keys outside the band are
never read.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from gptkernels import nn as gknn
from gptkernels.nn_mlp import _cast, autocast_dtype
from gptkernels.ops.attention import (
    decode_attention,
    flash_attn_func,
    flash_attn_varlen_func,
    scaled_dot_product_attention,
    sequence_positions,
)
from gptkernels.ops.cross_entropy import cross_entropy, linear_cross_entropy


def _fp32(loss):
    """The loss in fp32 whatever the autocast dtype (the kernels compute it in fp32; fp64 models keep fp64)."""
    return loss.float() if loss.dtype in (torch.float16, torch.bfloat16) else loss

@dataclass(frozen=True)
class GPTConfig:
    block_size: int = 1024  # maximum sequence length (learned positions)
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear layers and LayerNorms, as GPT-2
    layer_norm_epsilon: float = 1e-5
    activation: str = "gelu_tanh"  # GPT-2's gelu_new
    norm: str = "pre"  # "pre": h + f(LN(h)) (GPT-2, GPT-3); "post": LN(h + f(h)) (GPT-1)
    final_norm: bool = True  # a LayerNorm before lm_head (GPT-2, GPT-3); GPT-1 has none
    # Attention of each layer, repeated over the layers (layer i: attention_layers[i % len]): "global" is dense
    # causal, "local" a causal band of window_size keys (query i sees keys i - window_size < j <= i).
    attention_layers: tuple[str, ...] = ("global",)
    window_size: int = 256
    attn_scale: float | None = None  # multiplies q k^T; None: 1/sqrt(head_dim); GPT-Neo uses 1.0
    qkv_bias: bool = True  # a bias on the q/k/v projection (with bias); GPT-Neo has none

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "window_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"GPTConfig: {name} must be a positive int, got {v!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig: dropout must be in [0, 1), got {self.dropout!r}")
        if self.activation not in ("gelu_tanh", "gelu", "relu"):
            raise ValueError(f"GPTConfig: activation must be gelu_tanh, gelu or relu, got {self.activation!r}")
        if self.norm not in ("pre", "post"):
            raise ValueError(f"GPTConfig: norm must be 'pre' or 'post', got {self.norm!r}")
        layers = self.attention_layers
        if isinstance(layers, str) or not isinstance(layers, (tuple, list)) or not layers \
                or any(a not in ("global", "local") for a in layers):
            raise ValueError(f"GPTConfig: attention_layers must be a non-empty tuple of 'global' / 'local', got "
                             f"{layers!r}")
        object.__setattr__(self, "attention_layers", tuple(layers))  # a list from a JSON config reads the same
        if self.attn_scale is not None:
            if isinstance(self.attn_scale, bool) or not isinstance(self.attn_scale, (int, float)) \
                    or not math.isfinite(self.attn_scale) or self.attn_scale <= 0:
                raise ValueError(f"GPTConfig: attn_scale must be a positive float or None, got {self.attn_scale!r}")
            object.__setattr__(self, "attn_scale", float(self.attn_scale))  # the ops' eager path takes a float

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def layer_window(self, i: int) -> int | None:
        """The attention window of layer i: window_size on a local layer, None (dense causal) on a global one."""
        local = self.attention_layers[i % len(self.attention_layers)] == "local"
        return self.window_size if local else None

    @classmethod
    def preset(cls, name: str, **overrides) -> GPTConfig:
        """A named configuration (see PRESETS) with fields overridden, e.g. ``preset("gpt2", block_size=256)``."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
        known = {f.name for f in fields(cls)}
        bad = sorted(set(overrides) - known)
        if bad:
            raise ValueError(f"GPTConfig has no field(s) {', '.join(bad)}; fields: {', '.join(sorted(known))}")
        return replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict:
        return asdict(self)


_GPT1 = dict(norm="post", final_norm=False)
_TINY = dict(block_size=128, vocab_size=256, n_layer=2, n_head=2, n_embd=64)
_GPT3 = dict(block_size=2048, attention_layers=("global", "local"), window_size=256)
PRESETS = {  # GPT-2 first: the default family, and the first name that error messages list
    # GPT-2 sizes (Radford et al. 2019): 124M, 350M, 774M, 1558M parameters.
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),
    # GPT-1 (Radford et al. 2018): post-norm blocks and no final LayerNorm, 512 positions, 40478 BPE tokens; 117M.
    "gpt1": GPTConfig(block_size=512, vocab_size=40478, **_GPT1),
    # GPT-3 (Brown et al. 2020, table 2.1): GPT-2 blocks, 2048 positions, layers alternating dense and locally banded
    # attention. The paper gives no band width: 256, as GPT-Neo. XL: the table says 24 heads of 128, but
    # 24 * 128 != 2048; 16 heads of 128 (GPT-Neo 1.3B's shape) match d_model and the 1.3B parameters.
    "gpt3-small": GPTConfig(n_layer=12, n_head=12, n_embd=768, **_GPT3),
    "gpt3-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024, **_GPT3),
    "gpt3-large": GPTConfig(n_layer=24, n_head=16, n_embd=1536, **_GPT3),
    "gpt3-xl": GPTConfig(n_layer=24, n_head=16, n_embd=2048, **_GPT3),
    # Small ones for tests and CPU demos; byte-level vocab (256) for the built-in trainer corpus.
    "tiny": GPTConfig(**_TINY),
    "mini": GPTConfig(block_size=256, vocab_size=256, n_layer=4, n_head=4, n_embd=128),
    "small": GPTConfig(block_size=256, vocab_size=256, n_layer=6, n_head=6, n_embd=384),
    # tiny's shape in GPT-1's and GPT-3's layouts (window 16, so a 128-token context has keys outside the band).
    "gpt1-tiny": GPTConfig(**_TINY, **_GPT1),
    "gpt3-tiny": GPTConfig(**_TINY, attention_layers=("global", "local"), window_size=16),
}


class KVCache:
    """Keys and values of every layer for a batch of sequences of equal length.

    k, v: (n_layer, B, H, max_len, D). ``length`` (a Python int) is the number of cached positions; ``pos`` holds the
    same number as a device tensor, which a decode step reads and advances, so a CUDA graph of a step replays
    correctly (the graph advances ``pos``; call :meth:`sync_length` after replays to update ``length``).
    Local (banded) layers keep every position too, but a decode step reads only the band: see :meth:`band`.
    """

    def __init__(self, config: GPTConfig, batch: int, max_len: int | None = None, device=None, dtype=torch.float32):
        max_len = config.block_size if max_len is None else max_len
        if not 1 <= max_len <= config.block_size:
            raise ValueError(f"KVCache: max_len must be in [1, block_size={config.block_size}], got {max_len}")
        shape = (config.n_layer, batch, config.n_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = torch.zeros(1, device=device, dtype=torch.long)
        self.length = 0
        self.batch, self.max_len = batch, max_len
        # A band narrower than the cache: one token's decode step gathers its keys (made here, outside any capture).
        local = any(config.layer_window(i) is not None for i in range(config.n_layer))
        self.window = config.window_size if local and config.window_size < max_len else None
        self._offsets = torch.arange(self.window, device=device) if self.window else None

    def band(self):
        """For a one-token decode step (its key written at ``pos``): idx (window,), the cache positions of the band
        pos - window < j <= pos, oldest first, and n (1,), how many of them exist (min(pos + 1, window)); entries of
        idx past n are in range and never read. Computed on the device from ``pos``: static shapes, no sync, so the
        step stays capturable in a CUDA graph. None when no layer has a band narrower than the cache."""
        if self.window is None:
            return None
        n = (self.pos + 1).clamp(max=self.window)  # (1,)
        return self.pos + 1 - n + self._offsets, n  # (window,), (1,)

    def reset(self):
        self.pos.zero_()
        self.length = 0

    def sync_length(self):
        self.length = int(self.pos.item())

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class CausalSelfAttention(nn.Module):
    """Causal self-attention, dense (window None) or banded: query i sees keys i - window < j <= i."""

    def __init__(self, config: GPTConfig, backend=None, window: int | None = None):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias and config.qkv_bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.window, self.scale = window, config.attn_scale  # scale None: 1/sqrt(head_dim)
        self.backend = backend

    def forward(self, x, cache: KVCache | None = None, layer: int = 0, cu_seqlens=None, max_seqlen=None, band=None):
        B, T, C = x.shape
        qkv = self.c_attn(x)  # (B, T, 3C)
        p = self.dropout if self.training else 0.0
        w = self.window
        if cu_seqlens is not None:  # packed documents: the B*T tokens are one flat sequence of documents
            q, k, v = qkv.view(B * T, 3, self.n_head, C // self.n_head).unbind(1)  # three (B*T, H, D) views
            y = flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p=p,
                                       softmax_scale=self.scale, causal=True,
                                       window_size=(-1, 0) if w is None else (w - 1, 0),
                                       backend=self.backend)  # (B*T, H, D)
            return self._project(y.reshape(B, T, C))
        # (B, T, 3, H, D) -> three (B, H, T, D) views: the kernels read any strides, no copy here.
        q, k, v = qkv.view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4).unbind(0)
        if cache is None:
            y = scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, scale=self.scale, window=w,
                                             backend=self.backend)
        else:
            # Write the T new keys/values at positions pos .. pos+T-1 (in place, index from a device tensor).
            idx = cache.pos + torch.arange(T, device=x.device)
            cache.k[layer].index_copy_(2, idx, k.to(cache.k.dtype))
            cache.v[layer].index_copy_(2, idx, v.to(cache.v.dtype))
            if cache.length == 0:  # prefill: attention within the prompt, the fused kernel
                y = scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, window=w,
                                                 backend=self.backend)
            else:
                y = self._decode(q.to(cache.k.dtype), cache, layer, band).to(q.dtype)
        return self._project(y.transpose(1, 2).reshape(B, T, C))

    def _decode(self, q, cache, layer, band):
        """q (B, H, Tn, D): the Tn newest tokens (keys already in the cache) against the cache. Returns (B, H, Tn, D).
        A local layer reads only the keys in its band, never the older ones."""
        B, _, T, _ = q.shape
        k, v = cache.k[layer], cache.v[layer]  # (B, H, max_len, D)
        if self.window is None or cache.window is None:  # dense, or a band as wide as the cache
            return decode_attention(q, k, v, (cache.pos + T).expand(B), self.scale, backend=self.backend)
        if T == 1:  # the band gathered by device positions: static shapes, CUDA-graph capturable
            idx, n = band  # (window,), (1,)
            return decode_attention(q, k.index_select(2, idx), v.index_select(2, idx), n.expand(B), self.scale,
                                    backend=self.backend)
        # Several new tokens (chunked prefill, speculative decoding): the keys from the first query's band start to
        # the last new token, bottom-right aligned (query t sits at key position start + Tk - T + t). Host ints.
        start, end = max(0, cache.length - self.window + 1), cache.length + T
        y = flash_attn_func(q.transpose(1, 2), k[:, :, start:end].transpose(1, 2), v[:, :, start:end].transpose(1, 2),
                            softmax_scale=self.scale, causal=True, window_size=(self.window - 1, 0),
                            backend=self.backend)  # (B, T, H, D)
        return y.transpose(1, 2)

    def _project(self, y):  # (B, T, C) heads side by side -> the output projection and its dropout
        y = self.c_proj(y)
        return F.dropout(y, self.dropout, self.training) if self.dropout else y


class Block(nn.Module):
    def __init__(self, config: GPTConfig, backend=None, window: int | None = None):
        super().__init__()
        eps, bias = config.layer_norm_epsilon, config.bias
        self.ln_1 = gknn.LayerNorm(config.n_embd, eps=eps, bias=bias, backend=backend)
        self.attn = CausalSelfAttention(config, backend, window)
        self.ln_2 = gknn.LayerNorm(config.n_embd, eps=eps, bias=bias, backend=backend)
        self.mlp = gknn.FusedMLP(config.n_embd, 4 * config.n_embd, config.activation, bias, backend=backend)
        self.dropout = config.dropout
        self.post_norm = config.norm == "post"

    def forward(self, h, cache=None, layer=0, cu_seqlens=None, max_seqlen=None, band=None):
        if self.post_norm:
            return self._forward_post_norm(h, cache, layer, cu_seqlens, max_seqlen, band)
        a = self.attn(self.ln_1(h), cache, layer, cu_seqlens, max_seqlen, band)  # (B, T, C)
        m, h = self.ln_2(a, residual=h)  # h = h + a; m = ln_2(h)
        if self.dropout and self.training:  # dropout sits between the MLP and the residual add
            return h + F.dropout(self.mlp(m), self.dropout, True)
        return self.mlp(m, residual=h)  # h + mlp(m), the add done by the c_proj GEMM

    def _forward_post_norm(self, h, cache, layer, cu_seqlens, max_seqlen, band):
        """GPT-1: the LayerNorms sit after the residual adds, so the stream itself is normalized."""
        # Both halves are x = LN(x + f(x)): the fused add + LayerNorm, whose sum output is not needed. (Not
        # mlp(n, residual=n): one tensor twice into an autograd.Function breaks torch.compile's fullgraph.)
        a = self.attn(h, cache, layer, cu_seqlens, max_seqlen, band)  # (B, T, C)
        n, _ = self.ln_1(a, residual=h)  # n = ln_1(h + a)
        m = self.mlp(n)
        if self.dropout and self.training:
            m = F.dropout(m, self.dropout, True)
        return self.ln_2(m, residual=n)[0]  # ln_2(n + mlp(n))


class GPT(nn.Module):
    """GPT-1, GPT-2 and GPT-3-style models on gptkernels, as the config says (norm placement, final LayerNorm, dense
    or banded attention per layer). ``backend``: "cuda", "triton", "cpu", "torch" (the eager reference) or None
    (auto)."""

    def __init__(self, config: GPTConfig, backend: str | None = None):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"GPT: config must be a GPTConfig, got {type(config).__name__}")
        self.config, self.backend = config, backend
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config, backend, config.layer_window(i)) for i in range(config.n_layer)]),
        ))
        if config.final_norm:
            self.transformer.ln_f = gknn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias,
                                                   backend=backend)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as GPT-1, GPT-2, GPT-3
        self.apply(self._init_weights)
        if config.norm == "pre":
            # GPT-2 scales the init of the projections that write into the residual stream by 1/sqrt(2 * n_layer);
            # post-norm (GPT-1) renormalizes the stream after every add and keeps N(0, 0.02).
            std = 0.02 / math.sqrt(2 * config.n_layer)
            for name, p in self.named_parameters():
                if name.endswith("c_proj.weight"):
                    nn.init.normal_(p, mean=0.0, std=std)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, idx, targets=None, cache: KVCache | None = None, last_only: bool = False, *, cu_seqlens=None,
                max_seqlen: int | None = None, position_ids=None, return_logits: bool = False):
        """idx: (B, T) int64 token ids. targets: (B, T) or None (-1 = ignored). cache: a KVCache to prefill
        (cache.length == 0) or extend. last_only: compute logits for the last position only (generation).

        Packed documents (training on batches without padding; not with a cache):
            cu_seqlens: (nseq + 1,) int32 on idx's device, the start offsets of the documents in the flattened
                idx.view(-1) and its length B*T last; a document may span rows. Attention is causal within each
                document and never crosses into another.
            max_seqlen: int, at least the longest document (a host int, so no device sync); at most block_size.
            position_ids: (B, T) or (T,) positions for the position embedding. Default: 0 .. T-1 in every row, or with
                cu_seqlens the position within the document (derived on the device, no sync).

        return_logits: with targets, also build the logits. Without it the loss comes from linear_cross_entropy on
            the final hidden states and the LM head's weight, and the (B, T, V) logits never exist (GPT-2 at
            16 x 1024 tokens: 3.3 GB of fp32 logits and as much again for their gradient).

        Returns (logits, loss): logits (B, T, V) or (B, 1, V), float32 unless autocast, or None when targets are given
        without return_logits; loss (mean over targets != -1) is None without targets.
        """
        if idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"GPT: idx must be (B, T) int64 token ids, got {tuple(idx.shape)} {idx.dtype}")
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.block_size and cu_seqlens is None:  # packed: documents <= max_seqlen instead
            raise ValueError(f"GPT: sequence length {start + T} exceeds block_size {self.config.block_size}")
        if cache is not None and start + T > cache.max_len:
            raise ValueError(f"GPT: cache holds {cache.max_len} positions, {start + T} needed")
        if cache is not None and cache.batch != B:
            raise ValueError(f"GPT: cache was made for batch {cache.batch}, idx has batch {B}")
        dev = idx.device
        if cu_seqlens is not None or position_ids is not None or max_seqlen is not None:
            pos = self._packed_positions(idx, cache, cu_seqlens, max_seqlen, position_ids)  # (B, T) or (T,)
        else:
            pos = torch.arange(T, device=dev) + (cache.pos if cache is not None else 0)  # (T,)
        h = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        if self.config.dropout and self.training:
            h = F.dropout(h, self.config.dropout, True)
        ac = autocast_dtype(dev.type)  # the ops are not autocast-aware: the residual stream runs in that dtype
        h = _cast(h, ac)
        band = cache.band() if cache is not None and cache.length and T == 1 else None  # shared by local layers
        for i, block in enumerate(self.transformer.h):
            h = block(h, cache, i, cu_seqlens, max_seqlen, band)
        if cache is not None:
            cache.pos += T
            cache.length += T
        if last_only:
            h = h[:, -1:, :]
        if self.config.final_norm:
            h = self.transformer.ln_f(h)
        if targets is None:
            return self.lm_head(h), None
        if return_logits:
            logits = self.lm_head(h)
            return logits, _fp32(cross_entropy(logits, targets, ignore_index=-1, backend=self.backend))
        w, b = self.lm_head.weight, self.lm_head.bias
        if w.dtype != h.dtype:  # autocast: the head runs in h's dtype, as F.linear would under autocast
            w, b = w.to(h.dtype), (b.to(h.dtype) if b is not None else None)
        return None, _fp32(linear_cross_entropy(h, w, targets, bias=b, ignore_index=-1, backend=self.backend))

    def hidden_states(self, idx):
        """The final hidden states (B, T, C) of idx (B, T): after ln_f where the model has one, what lm_head reads.
        For heads other than the LM head (sequence classification); plain rows only, no cache, no packing."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"GPT: sequence length {T} exceeds block_size {self.config.block_size}")
        h = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(T, device=idx.device))  # (B, T, C)
        if self.config.dropout and self.training:
            h = F.dropout(h, self.config.dropout, True)
        h = _cast(h, autocast_dtype(idx.device.type))
        for i, block in enumerate(self.transformer.h):
            h = block(h, None, i)
        return self.transformer.ln_f(h) if self.config.final_norm else h

    def _packed_positions(self, idx, cache, cu_seqlens, max_seqlen, position_ids):
        """Checks the packing arguments (shapes and host ints only: no device sync) and returns the positions."""
        B, T = idx.shape
        if cache is not None:
            raise ValueError("GPT: cu_seqlens and position_ids are for training and scoring; a KVCache keeps its own "
                             "positions (pass one or the other)")
        if cu_seqlens is not None:
            if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 \
                    or cu_seqlens.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"GPT: cu_seqlens must be a 1-D int32 tensor of nseq + 1 >= 2 offsets, got "
                                 f"{getattr(cu_seqlens, 'shape', cu_seqlens)!r}")
            if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) \
                    or not 1 <= max_seqlen <= self.config.block_size:
                raise ValueError(f"GPT: max_seqlen must be an int in [1, block_size={self.config.block_size}] with "
                                 f"cu_seqlens (the longest document), got {max_seqlen!r}")
        elif max_seqlen is not None:
            raise ValueError("GPT: max_seqlen is given without cu_seqlens")
        if position_ids is not None:
            if tuple(position_ids.shape) not in ((B, T), (T,)):
                raise ValueError(f"GPT: position_ids must be ({B}, {T}) or ({T},), got {tuple(position_ids.shape)}")
            return position_ids.to(device=idx.device, dtype=torch.long)
        _, pos = sequence_positions(cu_seqlens.to(idx.device), B * T)
        return pos.view(B, T)  # (B, T) position within the document

    # ------------------------------------------------------------------------------------------------ numbers
    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; the position embedding is left out by default (the tied wte counts once, in lm_head)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (fwd + bwd): 6 N + 12 L C T (PaLM appendix B; attention scores and values), where
        a local layer's query sees min(T, window) keys instead of T: 6 N + 12 C sum_l T_l."""
        c = self.config
        T = c.block_size if seq_len is None else seq_len
        keys = sum(T if w is None else min(T, w) for w in map(c.layer_window, range(c.n_layer)))
        return 6 * self.num_params() + 12 * c.n_embd * keys

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """nn.Module.load_state_dict, with a clear error for a weight-only quantized checkpoint (``*.qweight`` keys)
        loaded into float layers (PyTorch would list missing and unexpected keys)."""
        quantized = sorted(k.removesuffix(".qweight") for k in state_dict if k.endswith(".qweight"))
        if quantized:
            modules = dict(self.named_modules())
            floats = [n for n in quantized if n in modules and not hasattr(modules[n], "qweight")]
            if floats:
                more = f" and {len(floats) - 3} more" if len(floats) > 3 else ""
                raise ValueError(
                    f"GPT.load_state_dict: the state dict holds weight-only quantized layers ({', '.join(floats[:3])}"
                    f"{more}) but this model's are float: build it with gptkernels.load_quantized(config, state_dict)"
                    f", or quantize this model first (gptkernels.quantize(model, bits, group_size))")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def configure_optimizer(self, lr: float, weight_decay: float = 0.1, betas=(0.9, 0.95), device_type="cpu"):
        return adamw(self, lr, weight_decay, betas, device_type)

    def make_cache(self, batch: int, max_len: int | None = None, dtype=None) -> KVCache:
        p = self.transformer.wte.weight
        # Under autocast the attention runs in the autocast dtype: a cache in the parameters' fp32 would double its
        # memory and run every decode step in fp32.
        dtype = dtype or autocast_dtype(p.device.type) or p.dtype
        return KVCache(self.config, batch, max_len, device=p.device, dtype=dtype)

    # --------------------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None, use_cache: bool = True, *,
                 min_p: float | None = None, repetition_penalty: float | None = None,
                 no_repeat_ngram_size: int | None = None):
        """Continue idx (B, T) by max_new_tokens tokens; returns (B, T + max_new_tokens).

        Sampling follows Hugging Face's generate (order and semantics: gptkernels.sample): repetition_penalty (> 0,
        1.0 = off) and no_repeat_ngram_size (>= 1) act on the whole history, prompt included; then temperature
        (0 = greedy), top_k (the k most likely tokens), top_p (the smallest set reaching probability p) and min_p
        (tokens at least min_p times as likely as the top one). Arguments are checked before the model runs.
        With use_cache (default) the prompt is prefilled once and each step attends to a KV cache; the total length
        must then fit in block_size. Without the cache every step reruns the whole (cropped) sequence.
        """
        from gptkernels.sample import Sampling

        if max_new_tokens < 0:
            raise ValueError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
        try:
            sampling = Sampling(temperature, top_k, top_p, min_p, repetition_penalty, no_repeat_ngram_size)
        except ValueError as e:
            raise ValueError(f"generate: {e}") from None
        B, T = idx.shape
        if use_cache:
            total = T + max_new_tokens
            if total > self.config.block_size:
                raise ValueError(f"generate: prompt ({T}) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
                                 f"block_size {self.config.block_size}; use_cache=False crops the context instead")
            cache = self.make_cache(B, total)
            logits, _ = self(idx, cache=cache, last_only=True)
            for i in range(max_new_tokens):
                nxt = sampling.sample(logits[:, -1, :], idx, generator)  # (B, 1)
                idx = torch.cat([idx, nxt], dim=1)
                if i + 1 < max_new_tokens:
                    logits, _ = self(nxt, cache=cache, last_only=True)
            return idx
        for _ in range(max_new_tokens):
            ctx = idx[:, -self.config.block_size:]  # the model sees the cropped context; the history stays whole
            logits, _ = self(ctx, last_only=True)
            idx = torch.cat([idx, sampling.sample(logits[:, -1, :], idx, generator)], dim=1)
        return idx

    # ------------------------------------------------------------------------------------------ Hugging Face
    @classmethod
    def from_hf(cls, model_or_path, backend: str | None = None) -> GPT:
        """A GPT holding the weights of a Hugging Face causal LM: ``OpenAIGPTLMHeadModel`` (GPT-1),
        ``GPT2LMHeadModel`` or ``GPTNeoForCausalLM`` (GPT-3's architecture), as an object or a local folder with
        config.json and the weights (nothing is downloaded). The config follows the model: GPT-1 is post-norm
        without a final LayerNorm; GPT-Neo has its per-layer global / local pattern and window, no 1/sqrt(d) score
        scaling and no q/k/v bias. Conv1D weights (in, out) are transposed to Linear; GPT-Neo's q/k/v are stacked."""
        hf = _hf_load(model_or_path) if isinstance(model_or_path, (str, os.PathLike)) else model_or_path
        hc = getattr(hf, "config", None)
        model_type = getattr(hc, "model_type", None)
        if model_type not in _HF_CLASSES:
            raise ValueError(f"from_hf: model type {model_type or type(hf).__name__!r} is not supported; supported: "
                             f"{_hf_supported()}")
        import transformers  # an object with a supported model_type comes from transformers

        want = _HF_CLASSES[model_type]
        if not isinstance(hf, getattr(transformers, want)):  # GPT2Model, GPT2ForSequenceClassification, ...
            raise ValueError(f"from_hf: a {type(hf).__name__} is not a causal language model with the {model_type} "
                             f"head; give a {want}")
        config, new = _HF_CONVERTERS[model_type](hc, hf.state_dict())
        model = cls(config, backend=backend)
        ours = model.state_dict()
        unexpected = sorted(set(new) - set(ours))
        if unexpected:
            raise ValueError(f"from_hf: unexpected key {unexpected[0]!r} in the Hugging Face state dict")
        missing = set(ours) - set(new)
        if missing - {"lm_head.weight"}:
            raise ValueError(f"from_hf: keys missing from the Hugging Face state dict: {sorted(missing)}")
        wte = new["transformer.wte.weight"]
        head = new.setdefault("lm_head.weight", wte)
        if head is not wte and (head.shape != wte.shape or not torch.equal(head, wte)):
            raise ValueError("from_hf: lm_head differs from the token embedding (tie_word_embeddings=False); GPT ties "
                             "them")
        with torch.no_grad():
            for k, p in ours.items():
                if tuple(p.shape) != tuple(new[k].shape):
                    raise ValueError(f"from_hf: {k} has shape {tuple(new[k].shape)}, expected {tuple(p.shape)}")
                p.copy_(new[k])
        return model.to(device=next(hf.parameters()).device)


# ---------------------------------------------------------------------------------------------- Hugging Face
# config.model_type -> the transformers class a folder is loaded with.
_HF_CLASSES = {"openai-gpt": "OpenAIGPTLMHeadModel", "gpt2": "GPT2LMHeadModel", "gpt_neo": "GPTNeoForCausalLM"}
_HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_MASK_BUFFER = re.compile(r"transformer\.h\.\d+\.attn\.(attention\.)?(masked_)?bias")  # old checkpoints' masks


def adamw(module: nn.Module, lr: float, weight_decay: float = 0.1, betas=(0.9, 0.95), device_type="cpu"):
    """AdamW over ``module``'s trainable parameters (frozen ones left out), with weight decay on matrices (dim >= 2)
    only; the fused CUDA implementation on a GPU."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    extra = {"fused": True} if device_type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, **extra)


def _hf_supported() -> str:
    return ", ".join(f"{t} ({c})" for t, c in _HF_CLASSES.items())


def _hf_load(path):
    """The transformers model saved in a local folder, of the class its config.json's model_type names."""
    path = os.fspath(path)
    cfg = os.path.join(path, "config.json")
    if not os.path.isdir(path) or not os.path.isfile(cfg):
        raise FileNotFoundError(f"from_hf: {path!r} is not a folder with a config.json (a saved Hugging Face "
                                f"model); hub names are not fetched")
    try:
        with open(cfg) as f:
            hc = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"from_hf: {cfg!r} is not readable JSON ({e})") from None
    if not isinstance(hc, dict) or not hc.get("model_type"):
        raise ValueError(f"from_hf: {cfg!r} names no model_type, so the model cannot be identified; supported: "
                         f"{_hf_supported()}")
    model_type = hc["model_type"]
    if model_type not in _HF_CLASSES:
        arch = hc.get("architectures")
        arch = f" ({', '.join(map(str, arch))})" if isinstance(arch, list) and arch else ""
        raise ValueError(f"from_hf: {path!r} holds a model of type {model_type!r}{arch}, which is not supported; "
                         f"supported: {_hf_supported()}")
    try:
        import transformers
    except ImportError as e:
        raise ImportError("from_hf with a path needs `pip install transformers`") from e
    try:
        return getattr(transformers, _HF_CLASSES[model_type]).from_pretrained(path, local_files_only=True)
    except OSError as e:  # no or unreadable weight files: transformers' message names what it looked for
        msg = " ".join(str(e).split())
        raise FileNotFoundError(f"from_hf: the {model_type} model in {path!r} could not be loaded: {msg}") from e


def _hf_activation(name, table=_HF_ACTIVATIONS):
    if name not in table:
        raise ValueError(f"from_hf: activation_function {name!r} not supported; supported: {', '.join(table)}")
    return table[name]


def _hf_mlp_width(inner, n_embd):
    if inner is not None and inner != 4 * n_embd:
        raise ValueError(f"from_hf: an MLP width (n_inner / intermediate_size) {inner} != 4 * n_embd is not "
                         f"supported")


def _conv1d_to_linear(sd, rename=()):
    """Our names (after the (old, new) prefix renames) with Conv1D weights transposed; mask buffers dropped."""
    out = {}
    for k, v in sd.items():
        if _MASK_BUFFER.fullmatch(k):
            continue
        for old, new in rename:
            if k.startswith(old):
                k = new + k[len(old):]
        out[k] = v.t() if k.endswith(_CONV1D) else v
    return out


def _from_hf_gpt2(hc, sd):
    """GPT-2: nanoGPT's names already."""
    if getattr(hc, "scale_attn_by_inverse_layer_idx", False) or not getattr(hc, "scale_attn_weights", True):
        raise ValueError("from_hf: only the default attention scaling 1/sqrt(head_dim) is supported "
                         "(scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False)")
    _hf_mlp_width(hc.n_inner, hc.n_embd)
    config = GPTConfig(block_size=hc.n_positions, vocab_size=hc.vocab_size, n_layer=hc.n_layer, n_head=hc.n_head,
                       n_embd=hc.n_embd, layer_norm_epsilon=hc.layer_norm_epsilon,
                       activation=_hf_activation(hc.activation_function))
    return config, _conv1d_to_linear(sd)


def _from_hf_openai_gpt(hc, sd):
    """GPT-1: post-norm (ln_1 after the attention add, ln_2 after the MLP add), no final LayerNorm, Conv1D weights
    as GPT-2, scores scaled by 1/sqrt(head_dim). HF's OpenAIGPT maps afn "gelu" to gelu_new, the tanh form (as the
    original GPT-1 code)."""
    act = _hf_activation(hc.afn, {"gelu": "gelu_tanh", "relu": "relu"})
    config = GPTConfig(block_size=hc.n_positions, vocab_size=hc.vocab_size, n_layer=hc.n_layer, n_head=hc.n_head,
                       n_embd=hc.n_embd, layer_norm_epsilon=hc.layer_norm_epsilon, activation=act, norm="post",
                       final_norm=False)
    rename = (("transformer.tokens_embed.", "transformer.wte."), ("transformer.positions_embed.", "transformer.wpe."))
    return config, _conv1d_to_linear(sd, rename)


def _from_hf_gpt_neo(hc, sd):
    """GPT-Neo: GPT-2 blocks with separate bias-free q/k/v Linears (stacked into c_attn here), out_proj -> c_proj,
    Linear (not Conv1D) MLP weights, unscaled scores (scale 1.0), and config.attention_layers' global / local pattern
    with local layers seeing keys i - window_size < j <= i (HF's mask: tril XOR tril(-window_size)). HF upcasts q and
    k to fp32 for the scores; our kernels accumulate q k^T and the softmax in fp32 whatever the input dtype."""
    _hf_mlp_width(hc.intermediate_size, hc.hidden_size)
    layers = tuple(hc.attention_layers)
    period = next(p for p in range(1, len(layers) + 1) if layers == layers[:p] * (len(layers) // p))
    config = GPTConfig(block_size=hc.max_position_embeddings, vocab_size=hc.vocab_size, n_layer=hc.num_layers,
                       n_head=hc.num_heads, n_embd=hc.hidden_size, layer_norm_epsilon=hc.layer_norm_epsilon,
                       activation=_hf_activation(hc.activation_function), attention_layers=layers[:period],
                       window_size=hc.window_size, attn_scale=1.0, qkv_bias=False)
    out, qkv = {}, {}
    for k, v in sd.items():
        if _MASK_BUFFER.fullmatch(k):
            continue
        m = re.fullmatch(r"(transformer\.h\.\d+\.attn\.)attention\.(.+)", k)
        if m:
            prefix, name = m.groups()
            if name in ("q_proj.weight", "k_proj.weight", "v_proj.weight"):
                qkv.setdefault(prefix, {})[name[0]] = v
                continue
            k = prefix + {"out_proj.weight": "c_proj.weight", "out_proj.bias": "c_proj.bias"}.get(name, name)
        out[k] = v
    for prefix, w in qkv.items():
        if len(w) == 3:  # else c_attn.weight is reported missing
            out[prefix + "c_attn.weight"] = torch.cat([w["q"], w["k"], w["v"]])  # (3C, C): c_attn's q, k, v order
    return config, out


_HF_CONVERTERS = {"openai-gpt": _from_hf_openai_gpt, "gpt2": _from_hf_gpt2, "gpt_neo": _from_hf_gpt_neo}
