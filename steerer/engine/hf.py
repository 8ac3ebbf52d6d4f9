"""The transformers backend: a KV-cached, left-padded running batch that rows can join and leave.

Rows join by prefilling separately and merging caches (shorter side padded on the left), and leave by
index-selecting the cache; columns that are padding for every remaining row are trimmed. That is enough
for continuous batching without touching transformers' own `generate`.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from steerer.engine.base import BatchState
from steerer.model import LoadedModel
from steerer.taps import LayerHooks, Phase


class HFEngine:
    def __init__(self, lm: LoadedModel, hooks: LayerHooks | None = None):
        from transformers import DynamicCache

        self.lm = lm
        self.model = lm.model
        self.config = lm.model.config
        self.hooks = hooks or LayerHooks(lm.model)
        self.num_layers = lm.num_layers
        self.hidden_size = lm.hidden_size
        eos = lm.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        eos.append(lm.tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted({int(e) for e in eos if e is not None}))
        self.pad_token_id = int(lm.tokenizer.pad_token_id)
        self._new_cache = lambda: DynamicCache(config=self.config)

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]]) -> tuple[torch.Tensor, BatchState]:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = self._new_cache()
        self.hooks.phase = Phase.PROMPT
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                         use_cache=True, logits_to_keep=1)
        lengths = mask.sum(-1)
        state = BatchState(cache, mask, lengths.clone(), lengths)
        return out.logits[:, -1].float(), state

    @torch.inference_mode()
    def decode(self, state: BatchState, tokens: torch.Tensor) -> torch.Tensor:
        ones = torch.ones((state.batch_size, 1), dtype=state.attention_mask.dtype)
        state.attention_mask = torch.cat([state.attention_mask, ones], dim=1)
        self.hooks.phase = Phase.GENERATED
        out = self.model(input_ids=tokens.view(-1, 1), attention_mask=state.attention_mask,
                         position_ids=state.next_position.view(-1, 1), cache=state.cache,
                         use_cache=True, logits_to_keep=1)
        state.next_position += 1
        return out.logits[:, -1].float()

    def merge(self, a: BatchState, b: BatchState) -> BatchState:
        width = max(a.attention_mask.shape[1], b.attention_mask.shape[1])
        cache = self._new_cache()
        for index, (layer_a, layer_b) in enumerate(zip(a.cache.layers, b.cache.layers, strict=True)):
            keys = torch.cat([_pad_left(layer_a.keys, width, 2), _pad_left(layer_b.keys, width, 2)])
            values = torch.cat([_pad_left(layer_a.values, width, 2), _pad_left(layer_b.values, width, 2)])
            cache.update(keys, values, index)
        mask = torch.cat([_pad_left(a.attention_mask, width, 1), _pad_left(b.attention_mask, width, 1)])
        return BatchState(cache, mask, torch.cat([a.next_position, b.next_position]),
                          torch.cat([a.prompt_lengths, b.prompt_lengths]))

    def select(self, state: BatchState, keep: torch.Tensor) -> BatchState:
        keep = torch.as_tensor(keep, dtype=torch.long)
        mask = state.attention_mask[keep]
        live = mask.any(dim=0).nonzero()
        start = int(live[0]) if len(live) else mask.shape[1]
        for layer in state.cache.layers:
            layer.keys = layer.keys[keep, :, start:]
            layer.values = layer.values[keep, :, start:]
        return BatchState(state.cache, mask[:, start:], state.next_position[keep], state.prompt_lengths[keep])


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    pad = [0, 0] * (tensor.ndim - dim - 1) + [missing, 0]
    return F.pad(tensor, pad)
