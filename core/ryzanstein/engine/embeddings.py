"""Text embeddings from any causal LM in the store: the mean of the last hidden state over the input's tokens
(after the model's final norm), scaled to unit length.

Mean pooling is what sentence-transformers uses for models without a pooling head; unit length makes the dot
product the cosine similarity, which is what OpenAI's embeddings give too. Each input runs alone (no padding), so
an input's vector does not depend on the other inputs of the request.
"""

from __future__ import annotations

from typing import Any

import torch


def base_model(model: Any) -> Any:
    """The transformer without its LM head (its output is the final-normed hidden state)."""
    inner = getattr(model, "base_model", None)
    return inner if inner is not None and inner is not model else model


def embed_ids(model: Any, ids: list[int]) -> list[float]:
    with torch.inference_mode():
        out = base_model(model)(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False)
        hidden = out.last_hidden_state[0].float()
        pooled = hidden.mean(dim=0)
        return torch.nn.functional.normalize(pooled, dim=0).tolist()
