"""Hugging Face transformers: gptkernels attention as an ``attn_implementation``.

    from gptkernels.integrations import hf
    hf.register()
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="gptkernels")

``register`` adds :func:`attention_forward` to HF's attention-function registry (``AttentionInterface``) and HF's
``sdpa_mask`` to its mask registry under the same name, so the model builds the masks SDPA gets: a boolean
(B, 1, Tq, Tk) keep-mask with padding and causality in it, or None when the call is plainly causal (then the
module's ``is_causal`` says so). Float additive masks (what "eager" models build) are taken too, which is how
``gptkernels.patch`` uses this function inside models loaded with "eager" or "sdpa".

Needs transformers >= 5 (the ``AttentionInterface`` / ``AttentionMaskInterface`` registries).
"""

from __future__ import annotations

from gptkernels.ops.attention import scaled_dot_product_attention

NAME = "gptkernels"
_DEFAULT = {"backend": None}


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
            supported and raise; the others (sliding_window, position_ids, ...) are already in the mask.

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
