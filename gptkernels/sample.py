"""Next-token sampling: temperature, top-k and top-p (nucleus), reproducible with a torch.Generator."""

from __future__ import annotations

import torch


def sample_next(logits, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None):
    """logits: (B, V). Returns (B, 1) int64 token ids.

    temperature 0 (or below 1e-8) is greedy (argmax; top_k/top_p are then irrelevant). Otherwise the logits are
    divided by temperature, cut to the top_k largest, then to the smallest set whose probability reaches top_p (the
    most likely token always survives), and one token is drawn per row with ``generator``.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
    logits = logits.float()
    if temperature < 1e-8:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens before it already reach top_p; the first one is always kept.
        drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    if generator is not None and generator.device != probs.device:
        # Draw on the generator's device so a CPU generator gives the same tokens for CPU and GPU runs.
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator)
