"""The transformers backend: a KV-cached, left-padded running batch that rows can join and leave.

Rows join by prefilling separately and merging caches (shorter side padded on the left), and leave by
index-selecting the cache; columns that are padding for every remaining row are trimmed. That is enough
for continuous batching without touching transformers' own `generate`. Every tensor lives on the model's
device. Taps and steering are forward hooks (`taps.LayerHooks`); a prefill's tokens are all prompt
tokens and a decode's all generated, which is the per-token mask the hooks read.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from steerer.driver import eos_token_ids as merge_eos
from steerer.engine.base import BatchState
from steerer.model import LoadedModel
from steerer.taps import LayerHooks, LayerSteering


class HFEngine:
    def __init__(self, lm: LoadedModel, hooks: LayerHooks | None = None):
        from transformers import DynamicCache

        self.lm = lm
        self.model = lm.model
        self.config = lm.model.config
        self.hooks = hooks or LayerHooks(lm.model)
        self.device = next(lm.model.parameters()).device
        self.num_layers = lm.num_layers
        self.hidden_size = lm.hidden_size
        self.eos_token_ids = eos_token_ids(lm.model, lm.tokenizer)
        self.pad_token_id = int(lm.tokenizer.pad_token_id)
        self._new_cache = lambda: DynamicCache(config=self.config)

    def install(self, tap_layers: tuple[int, ...], steering: dict[int, LayerSteering]) -> None:
        self.hooks.remove()
        self.hooks = LayerHooks(self.model, tap_layers=tap_layers, steering=steering).attach()

    def uninstall(self) -> None:
        self.hooks.remove()

    def residuals(self) -> dict[int, torch.Tensor]:
        return dict(self.hooks.captured)

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
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = self._new_cache()
        self.hooks.set_pass(generated=False)  # every token of a prefill is a prompt token
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                         use_cache=True, logits_to_keep=1)
        lengths = mask.sum(-1)
        state = BatchState(cache, mask, lengths.clone(), lengths)
        return out.logits[:, -1].float(), state

    @torch.inference_mode()
    def decode(self, state: BatchState, tokens: torch.Tensor) -> torch.Tensor:
        ones = torch.ones((state.batch_size, 1), dtype=state.attention_mask.dtype, device=self.device)
        state.attention_mask = torch.cat([state.attention_mask, ones], dim=1)
        self.hooks.set_pass(generated=True)  # every row feeds a generated token (or its EOS, closing)
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
        keep = torch.as_tensor(keep, dtype=torch.long, device=self.device)
        mask = state.attention_mask[keep]
        start = int(mask.any(dim=0).int().argmax()) if mask.shape[0] else mask.shape[1]  # first column in use
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


def eos_token_ids(model: torch.nn.Module, tokenizer) -> tuple[int, ...]:
    """The tokens that end a row: the generation config's EOS ids and the tokenizer's (`driver.eos_token_ids`)."""
    return merge_eos(model.generation_config.eos_token_id, tokenizer.eos_token_id)
