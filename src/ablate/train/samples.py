"""Continuations of held-out prompts, so that a reader sees what a model learned."""
from __future__ import annotations

import numpy as np
import torch

PROMPT_TOKENS = 64


@torch.no_grad()
def continuations(model, data, n: int, tokens: int, device: torch.device, seed: int,  # noqa: ANN001
                  temperature: float = 0.8, top_k: int = 40) -> str:
    """`n` held-out prompts (the first tokens of validation documents) each continued by `tokens`
    sampled tokens (temperature, top-k), as text; '' when the tokenizer cannot decode."""
    tokenizer = data.tokenizer
    docs = data.val_docs
    if n == 0 or docs.n_docs == 0:
        return ""
    try:
        tokenizer.decode([0])
    except NotImplementedError:
        return ""
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    window = model.max_length or (PROMPT_TOKENS + tokens)
    prompts = [docs.document(i)[:PROMPT_TOKENS] for i in range(min(n, docs.n_docs))]
    width = min(len(p) for p in prompts)  # every prompt as long as the shortest: one batch
    out = torch.from_numpy(np.stack([p[:width] for p in prompts]).astype(np.int64)).to(device)
    for _ in range(tokens):  # all prompts at once
        logits = model(out[:, -window:])[:, -1].float() / temperature
        kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]
        probs = logits.masked_fill(logits < kth, float("-inf")).softmax(-1)
        out = torch.cat([out, torch.multinomial(probs, 1, generator=gen)], dim=1)
    model.train(was_training)
    parts = [f"=== held-out prompt {i + 1} ===\n{tokenizer.decode(row[:width].tolist())}\n--- continuation ---\n"
             f"{tokenizer.decode(row[width:].tolist())}\n" for i, row in enumerate(out)]
    return "\n".join(parts)
