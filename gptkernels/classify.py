"""Sequence classification on a GPT, GPT-1's fine-tuning recipe (Radford et al. 2018, section 3.2):

    h      = gpt.hidden_states(x)                     # (B, T, C) after ln_f where the model has one
    logits = score(h[b, last[b]])                     # (B, n_classes): the last real token's state, Linear(C, K)
    loss   = CE(logits, label) + aux_lm * LM(h, x)    # the auxiliary LM loss on the same text (padding ignored)

The head is a bias-free Linear named ``score``, as in Hugging Face's GPT2ForSequenceClassification, whose weights
:meth:`GPTClassifier.from_hf` loads; HF pools the last token that is not pad_token_id (the rightmost one), which
:func:`last_non_pad` computes the same way.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from gptkernels.model import _HF_CONVERTERS, GPT, GPTConfig, _hf_supported, adamw
from gptkernels.ops.cross_entropy import linear_cross_entropy

# model_type -> the transformers class of a sequence-classification model of that family.
HF_CLASSIFIERS = {"gpt2": "GPT2ForSequenceClassification", "openai-gpt": "OpenAIGPTForSequenceClassification",
                  "gpt_neo": "GPTNeoForSequenceClassification"}


def last_non_pad(idx: torch.Tensor, pad_id: int) -> torch.Tensor:
    """(B,) index of the rightmost token != pad_id in each row of idx (B, T); 0 for a row of padding only. Hugging
    Face's rule for its sequence-classification heads."""
    T = idx.shape[1]
    return ((idx != pad_id).long() * torch.arange(T, device=idx.device)).argmax(-1)


class GPTClassifier(nn.Module):
    """A GPT body (``gpt``, its LM head kept for the auxiliary loss) and a linear head ``score`` (C -> n_classes)."""

    def __init__(self, config: GPTConfig, n_classes: int, backend: str | None = None):
        super().__init__()
        self.gpt = GPT(config, backend=backend)
        self.score = nn.Linear(config.n_embd, n_classes, bias=False)
        nn.init.normal_(self.score.weight, mean=0.0, std=0.02)
        self.config, self.n_classes = config, n_classes

    def forward(self, idx, last=None, labels=None, lm_targets=None, aux_lm: float = 0.0):
        """idx: (B, T) token ids. last: (B,) index of each row's last real token (default: T - 1). labels: (B,) class
        indices. lm_targets: (B, T) next-token targets, -1 ignored (needed when aux_lm > 0).

        Returns (logits (B, n_classes) fp32, loss or None): loss = CE(logits, labels) + aux_lm * LM loss."""
        h = self.gpt.hidden_states(idx)  # (B, T, C)
        B = idx.shape[0]
        if last is None:
            last = torch.full((B,), idx.shape[1] - 1, device=idx.device, dtype=torch.long)
        pooled = h[torch.arange(B, device=idx.device), last]  # (B, C)
        logits = self.score(pooled).float()
        if labels is None:
            return logits, None
        loss = F.cross_entropy(logits, labels)
        if aux_lm:
            w = self.gpt.lm_head.weight
            w = w.to(h.dtype) if w.dtype != h.dtype else w
            lm = linear_cross_entropy(h, w, lm_targets, ignore_index=-1, backend=self.gpt.backend)
            loss = loss + aux_lm * lm.float()
        return logits, loss

    def configure_optimizer(self, lr: float, weight_decay: float = 0.1, betas=(0.9, 0.95), device_type="cpu"):
        return adamw(self, lr, weight_decay, betas, device_type)

    def flops_per_token(self, seq_len: int) -> float:
        return self.gpt.flops_per_token(seq_len)

    @classmethod
    def from_hf(cls, hf, backend: str | None = None) -> GPTClassifier:
        """Our classifier holding a Hugging Face GPT2/OpenAIGPT/GPTNeo ForSequenceClassification model's weights (an
        object, or a local folder with config.json and the weights)."""
        if isinstance(hf, (str, os.PathLike)):
            hf = _hf_load_classifier(hf)
        hc = getattr(hf, "config", None)
        model_type = getattr(hc, "model_type", None)
        if model_type not in _HF_CONVERTERS:
            raise ValueError(f"from_hf: model type {model_type or type(hf).__name__!r} is not supported; supported: "
                             f"{_hf_supported()}")
        sd = hf.state_dict()
        if "score.weight" not in sd:
            raise ValueError(f"from_hf: {type(hf).__name__} has no score head (a *ForSequenceClassification model "
                             f"has one)")
        if sd.get("score.bias") is not None:
            raise ValueError("from_hf: a score head with a bias is not supported")
        score = sd["score.weight"]
        config, new = _HF_CONVERTERS[model_type](hc, {k: v for k, v in sd.items() if not k.startswith("score.")})
        model = cls(config, score.shape[0], backend=backend)
        new = {f"gpt.{k}": v for k, v in new.items()}
        new["gpt.lm_head.weight"] = new["gpt.transformer.wte.weight"]
        new["score.weight"] = score
        model.load_state_dict(new)
        return model.to(device=score.device)


def freeze(gpt: GPT, what) -> list[str]:
    """Stop the gradients of a GPT's "embeddings" (wte and wpe; the LM head is tied to wte) or of its first N blocks
    (an int or a digit string). Returns the frozen parameter names."""
    t = gpt.transformer
    if what == "embeddings":
        modules = [("transformer.wte", t.wte), ("transformer.wpe", t.wpe)]
    else:
        modules = [(f"transformer.h.{i}", t.h[i]) for i in range(int(what))]
    names = []
    for prefix, m in modules:
        for n, p in m.named_parameters():
            p.requires_grad_(False)
            names.append(f"{prefix}.{n}")
    return names


def _hf_load_classifier(path):
    import json

    path = os.fspath(path)
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        raise FileNotFoundError(f"from_hf: {path!r} is not a folder with a config.json")
    with open(cfg) as f:
        model_type = json.load(f).get("model_type")
    if model_type not in HF_CLASSIFIERS:
        raise ValueError(f"from_hf: {path!r} holds a model of type {model_type!r}, which is not supported; "
                         f"supported: {', '.join(HF_CLASSIFIERS)}")
    import transformers

    return getattr(transformers, HF_CLASSIFIERS[model_type]).from_pretrained(path, local_files_only=True)
