"""Hugging Face transformers: gptkernels attention as an ``attn_implementation``.

    from gptkernels.integrations import hf
    hf.register()
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="gptkernels")

``register`` adds :func:`attention_forward` to HF's attention-function registry (``AttentionInterface``) and HF's
``sdpa_mask`` to its mask registry under the same name, so the model builds the masks SDPA gets: a boolean
(B, 1, Tq, Tk) keep-mask with padding and causality in it, or None when the call is plainly causal (then the
module's ``is_causal`` says so). Float additive masks (what "eager" models build) are taken too, which is how
``gptkernels.patch`` uses this function inside models loaded with "eager" or "sdpa".

Padding-free batches (``DataCollatorWithFlattening``: several sequences laid end to end in one row, position_ids
restarting at each) run through :func:`gptkernels.flash_attn_varlen_func`, causal within each sequence and never
across two, instead of through the (1, 1, T, T) mask: from the ``cu_seq_lens_q/k`` and ``max_length_q/k`` kwargs
when the collator made them (``return_flash_attn_kwargs=True``), else from position_ids, as transformers' own
flash-attention path does.

Needs transformers >= 5 (the ``AttentionInterface`` / ``AttentionMaskInterface`` registries).
"""

from __future__ import annotations

import weakref

import torch

from gptkernels.ops.attention import flash_attn_varlen_func, scaled_dot_product_attention

NAME = "gptkernels"
_DEFAULT = {"backend": None}
_BOUNDARIES = {}  # the last position_ids read: (weakref, version, result); every layer of a forward reuses it


def sequence_boundaries(position_ids):
    """(cu_seqlens int32 (nseq + 1,) on position_ids' device, max_seqlen int) of a padding-free row, or None when
    the row holds one sequence. A sequence starts where the position does not follow the previous one by 1 (so
    models that start counting at 2, as RoBERTa's, work too).

    position_ids: (1, T) or (T,). Its values are read on the host: one device sync per forward on a GPU, as in
    transformers' flash-attention path, since the result is cached for as long as the same tensor comes back
    unchanged (the layers of one forward share it).
    """
    hit = _BOUNDARIES.get("last")
    if hit is not None and hit[0]() is position_ids and hit[1] == position_ids._version:
        return hit[2]
    pos = position_ids.reshape(-1).to("cpu", torch.int64)  # (T,)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[1:] = pos[1:] != pos[:-1] + 1
    first = starts.nonzero().view(-1)  # (nseq,)
    result = None
    if first.numel() > 1:
        cu = torch.cat([first, torch.tensor([pos.numel()])]).to(torch.int32)
        result = cu.to(position_ids.device, non_blocking=True), int((cu[1:] - cu[:-1]).max())
    _BOUNDARIES["last"] = (weakref.ref(position_ids), position_ids._version, result)
    return result


def _varlen_args(query, key, kwargs):
    """(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) of a padding-free batch, else None."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
    if all(x is not None for x in (cu_q, cu_k, max_q, max_k)):
        return cu_q, cu_k, int(max_q), int(max_k)
    pos = kwargs.get("position_ids")
    B, Tq, Tk = query.shape[0], query.shape[2], key.shape[2]
    # As transformers: one flattened row of several tokens; decoding (Tq = 1) and a cache (Tk > Tq) are not packed.
    if not isinstance(pos, torch.Tensor) or B != 1 or Tq == 1 or Tk != Tq or pos.numel() != Tq:
        return None
    found = sequence_boundaries(pos)
    return None if found is None else (found[0], found[0], found[1], found[1])


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      **kwargs):
    """HF's attention-function contract, on gptkernels.scaled_dot_product_attention.

    Args:
        module: the calling attention module (its ``is_causal`` is the default; a module patched by
            ``gptkernels.patch`` carries the backend it was patched with).
        query: (B, H, Tq, D); key, value: (B, Hkv, Tk, D), Hkv dividing H (GQA without repeating kv).
        attention_mask: None, bool (B or 1, 1 or H, Tq, Tk) with True = attend, or float additive of that shape.
        dropout: attention dropout probability (HF passes 0.0 in eval mode).
        scaling: multiplies q k^T; None means 1/sqrt(D).
        is_causal: overrides ``module.is_causal`` when given.
        kwargs: the rest of HF's attention kwargs. ``softcap``, ``s_aux`` (sinks) and ``position_bias`` are not
            supported and raise. A padding-free batch is recognized by ``cu_seq_lens_q``, ``cu_seq_lens_k``,
            ``max_length_q`` and ``max_length_k`` (all four), or by ``position_ids`` (1, T) that restart within the
            row (B = 1, no cache); it runs through flash_attn_varlen_func and the mask is not read, since
            transformers builds it from the same boundaries (such a row holds no padding); ``sliding_window`` is
            applied there. Otherwise sliding_window and position_ids are already in the mask.

    Returns:
        (attn_output (B, Tq, H, D) contiguous, None): no attention weights, as with "sdpa".
    """
    for unsupported in ("softcap", "s_aux", "position_bias"):
        if kwargs.get(unsupported) is not None:
            raise NotImplementedError(f"gptkernels attention: {unsupported!r} is not supported; use "
                                      f"attn_implementation='eager' or 'sdpa' for this model")
    state = getattr(module, "__dict__", {}).get("_gptkernels_patch") or {}
    backend = state.get("backend", _DEFAULT["backend"])
    q_len, kv_len = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    varlen = _varlen_args(query, key, kwargs)
    if varlen is not None:
        B, H, _, D = query.shape
        Hkv = key.shape[1]
        sw = kwargs.get("sliding_window")
        window = (-1, -1) if sw is None else (sw - 1, 0 if causal else sw - 1)
        q = query.transpose(1, 2).reshape(B * q_len, H, D)  # (total, H, D)
        k = key.transpose(1, 2).reshape(B * kv_len, Hkv, D)
        v = value.transpose(1, 2).reshape(B * kv_len, Hkv, value.shape[-1])
        out = flash_attn_varlen_func(q, k, v, *varlen, dropout_p=float(dropout), softmax_scale=scaling,
                                     causal=bool(causal), window_size=window, backend=backend)
        return out.view(B, q_len, H, -1), None
    # As HF's sdpa path: a None mask with Tq > 1 is "plain causal"; one query row (decoding) sees the whole cache.
    causal = bool(q_len > 1 and attention_mask is None and causal)
    if causal and kv_len > q_len:
        # Only a prefill into an empty preallocated (static) cache gets here: the slots past Tq hold no keys yet.
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    out = scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=float(dropout),
                                       is_causal=causal, scale=scaling, enable_gqa=key.shape[1] != query.shape[1],
                                       backend=backend)  # (B, H, Tq, D)
    return out.transpose(1, 2).contiguous(), None


def register(backend=None, name=NAME):
    """Register gptkernels attention with transformers as ``attn_implementation=name`` (idempotent).

    Args:
        backend: the gptkernels backend for models loaded with this implementation ("cuda", "triton", "cpu",
            "torch", or None: GPTKERNELS_BACKEND, then automatic per call). Modules patched by
            ``gptkernels.patch`` use the backend they were patched with instead.
        name: the implementation name to register.
    """
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as e:
        raise ImportError(f"gptkernels.integrations.hf needs transformers >= 5 with AttentionInterface and "
                          f"AttentionMaskInterface ({e}); pip install 'transformers>=5'") from e
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    _DEFAULT["backend"] = backend
