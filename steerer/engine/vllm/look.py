"""`Look`: residual taps (and fixed per-request steering) on vLLM without a probe bank.

What `steerer generate --layers 0,1 --json` does on transformers, on vLLM: the same `Steerer<Arch>` model
class and custom op as `VLLMSteerer`, with the op's state (`state.STATE`) installed for the chosen layers
and no controller. One request per slot; after each engine step, each request that gained a token reads its
row's residual at the position that predicted it (the tap `STATE.captured` holds, `hidden + residual`).
Steering, when asked: each request's fixed alpha along one unit direction per layer (`Where` as on
transformers). Used by the CLI and by the family tests, which compare it with the transformers backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from steerer.engine.vllm import LAYERS_KEY, checkpoint_architecture
from steerer.taps import LayerSteering, Where, unit_directions


@dataclass
class Trace:
    """One request's greedy (or sampled) tokens and, per token, the tapped residuals at the position that
    predicted it (layer -> [d] fp32)."""

    tokens: list[int] = field(default_factory=list)
    residuals: list[dict[int, torch.Tensor]] = field(default_factory=list)
    finish_reason: str | None = None

    def norms(self, digits: int = 3) -> list[dict[str, float]]:
        return [{str(layer): round(float(x.norm()), digits) for layer, x in step.items()} for step in self.residuals]


class Look:
    """One vLLM engine whose op taps `layers` (and may steer them). Close it (or use `with`) to free the op."""

    def __init__(self, model: str | None, layers: Sequence[int], *, dtype: str = "float32",
                 enforce_eager: bool = True, max_model_len: int = 1024, max_num_seqs: int = 2, seed: int = 0,
                 llm_kwargs: dict[str, Any] | None = None) -> None:
        from vllm import LLM

        from steerer.engine.vllm.driver import check_version, configure_environment
        from steerer.engine.vllm.plugin import register
        from steerer.engine.vllm.rows import SteererRows
        from steerer.engine.vllm.runner import check_v1_runner
        from steerer.engine.vllm.state import STATE
        from steerer.model import resolve_model_path

        configure_environment()
        check_version()
        check_v1_runner()
        if STATE.installed:
            raise RuntimeError("another steerer engine holds this process's vLLM plugin state; close it first")
        register()
        self.path = resolve_model_path(model)
        self.layers = tuple(sorted({int(layer) for layer in layers}))
        overrides = {"architectures": [checkpoint_architecture(self.path)], LAYERS_KEY: list(self.layers)}
        kwargs = dict(model=self.path, dtype=dtype, enforce_eager=enforce_eager, max_model_len=max_model_len,
                      max_num_seqs=max_num_seqs, enable_prefix_caching=False, async_scheduling=False, seed=seed,
                      hf_overrides=overrides, logits_processors=[SteererRows])
        kwargs.update(llm_kwargs or {})
        self.llm = LLM(**kwargs)
        self.engine = self.llm.llm_engine
        config = self.engine.model_config.hf_config
        n = int(config.num_hidden_layers)
        bad = [layer for layer in self.layers if not 0 <= layer < n]
        if bad:
            raise ValueError(f"layers {bad} out of range: the model has {n} decoder layers (0..{n - 1})")
        self.hidden_size = int(config.hidden_size)
        self.max_num_seqs = max_num_seqs

    def run(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
            steering: dict[int, tuple[torch.Tensor, Sequence[float]]] | None = None, where: str = "both",
            stop_at_eos: bool = True) -> list[Trace]:
        """Generate greedily for each prompt (token ids) in one batch. `steering`: layer -> (direction [d],
        one alpha per prompt); each prompt's row gets alpha * unit(direction) at that layer."""
        from vllm import SamplingParams

        from steerer.engine.vllm.state import STATE

        if len(prompts) > self.max_num_seqs:
            raise ValueError(f"{len(prompts)} prompts; this engine runs {self.max_num_seqs} at a time")
        steer = {}
        for layer, (direction, alphas) in (steering or {}).items():
            if layer not in self.layers:
                raise ValueError(f"layer {layer} is not one of this engine's op layers {list(self.layers)}")
            s = LayerSteering(unit_directions(direction), Where(where))
            s.set_coeffs(torch.tensor([[float(a)] for a in alphas], dtype=torch.float32))
            steer[layer] = s
        STATE.install(len(prompts), self.layers, steer, max_rows=self.max_num_seqs,
                      dtype=self.engine.model_config.dtype)
        traces = [Trace() for _ in prompts]
        ids = {}
        try:
            for slot, prompt in enumerate(prompts):
                params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, ignore_eos=not stop_at_eos,
                                        detokenize=False, extra_args={"steerer_slot": slot})
                request_id = f"look-{slot}"
                ids[request_id] = slot
                self.engine.add_request(request_id, {"prompt_token_ids": list(prompt)}, params)
            seen = STATE.passes
            while self.engine.has_unfinished_requests():
                outputs = self.engine.step()
                info = STATE.last_pass()
                fresh = info is not None and info.number != seen
                seen = STATE.passes
                for output in outputs:
                    slot = ids[output.request_id]
                    tokens = list(output.outputs[0].token_ids)
                    trace = traces[slot]
                    new = tokens[len(trace.tokens):]
                    if new:
                        if not fresh or len(new) != 1:
                            raise RuntimeError("steerer: vLLM produced tokens without one pass the plugin saw")
                        row = info.slots.index(slot)
                        trace.residuals.append({layer: STATE.captured[layer][row].float().clone()
                                                for layer in self.layers})
                        trace.tokens.extend(new)
                    if output.finished:
                        trace.finish_reason = output.outputs[0].finish_reason
        finally:
            STATE.uninstall()
        return traces

    def close(self) -> None:
        """Release the op's state (the engine itself is freed with the object, as `VLLMSteerer`'s)."""
        from steerer.engine.vllm.state import STATE

        STATE.uninstall()

    def __enter__(self) -> Look:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
