"""Tiny random-weight checkpoints of each supported family, built locally (nothing is downloaded).

`build_tiny(family, folder)` writes a transformers checkpoint (safetensors, fp32) plus the default model's
tokenizer, so both backends can load it by path. Sizes are tiny (2 layers by default, hidden 128, 4 query
heads / 2 KV heads, head_dim 32: everything divides by 2 for tensor parallel, and vLLM's CPU attention
supports head sizes from 32 up only) and every 1-D weight (norm weights,
attention biases) is perturbed away from its init, so a backend that drops Qwen2's biases, forgets Gemma's
(1 + w) norm offset or ignores tied embeddings gives different numbers. A larger `initializer_range` than
the families' default keeps greedy argmaxes away from near-ties between the backends.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")


def _common(tokenizer, layers: int, hidden: int, heads: int, kv_heads: int) -> dict[str, Any]:
    return dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                max_position_embeddings=1024, initializer_range=0.1, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def tiny_config(family: str, tokenizer, layers: int = 2, hidden: int = 128, heads: int = 4, kv_heads: int = 2):
    """The transformers config of a tiny `family` checkpoint (one of `FAMILIES`)."""
    import transformers as tf

    base = _common(tokenizer, layers, hidden, heads, kv_heads)
    head_dim = hidden // heads
    if family == "llama":
        return tf.LlamaConfig(**base, head_dim=head_dim, tie_word_embeddings=True)
    if family == "mistral":
        return tf.MistralConfig(**base, head_dim=head_dim, sliding_window=None)
    if family == "qwen2":
        return tf.Qwen2Config(**base, tie_word_embeddings=False)
    if family == "qwen3":
        return tf.Qwen3Config(**base, head_dim=head_dim, tie_word_embeddings=False)
    if family == "gemma2":
        return tf.Gemma2Config(**base, head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=256,
                               attn_logit_softcapping=50.0, final_logit_softcapping=30.0, tie_word_embeddings=True)
    if family == "gemma3":
        return tf.Gemma3TextConfig(**base, head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=256,
                                   tie_word_embeddings=True)
    if family == "phi3":
        return tf.Phi3Config(**base, tie_word_embeddings=False)
    raise ValueError(f"unknown tiny family {family!r}; choose one of {', '.join(FAMILIES)}")


def default_tokenizer():
    """The default model's tokenizer (from the prepared SmolLM2 folder: no download)."""
    from transformers import AutoTokenizer

    from steerer.model import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path(None))


def build_tiny(family: str, folder: str | Path, *, seed: int = 0, layers: int = 2, hidden: int = 128,
               heads: int = 4, kv_heads: int = 2) -> Path:
    """Write a tiny random-weight `family` checkpoint (fp32 safetensors + tokenizer) into `folder`; returns it.
    Deterministic in `seed`; an existing complete folder is reused."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    if (folder / "config.json").exists() and any(folder.glob("*.safetensors")):
        return folder
    tokenizer = default_tokenizer()
    config = tiny_config(family, tokenizer, layers, hidden, heads, kv_heads)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:  # norms and biases: move them off their init so they matter
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def hf_trace(model, prompt: list[int], layers: tuple[int, ...], max_new_tokens: int) -> tuple[list[int], list[dict]]:
    """Greedy tokens of one prompt on the transformers backend and, per token, the tapped residuals ([d] fp32)
    at the position that predicted it: the reference the vLLM family tests compare with. `model`: a
    `steerer.model.LoadedModel`."""
    from steerer.engine.hf import HFEngine
    from steerer.generation import SamplingParams, generate
    from steerer.taps import LayerHooks

    steps: list[dict] = []

    class Recorder:
        def before_forward(self, rows, index) -> None:
            pass

        def after_forward(self, view) -> None:
            steps.append({layer: view.residuals[layer][0].float().clone() for layer in layers})

    with LayerHooks(model.model, tap_layers=layers) as hooks:
        result = generate(HFEngine(model, hooks), [prompt], SamplingParams(max_new_tokens, 0.0), Recorder())[0]
    return list(result.tokens), steps[: len(result.tokens)]


def main(argv: list[str] | None = None) -> None:
    """`python -m steerer.testing.tiny build DIR --family F` builds a checkpoint; `... trace DIR... --prompt P` prints the
    transformers reference (greedy tokens, tap norms per token) as JSON, for tests running in another venv."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m steerer.testing.tiny")
    parser.add_argument("command", choices=["build", "trace"])
    parser.add_argument("folder", nargs="+", help="build: one folder; trace: one or more checkpoints")
    parser.add_argument("--family", default="llama", choices=FAMILIES)
    parser.add_argument("--prompt", action="append", default=[])
    parser.add_argument("--layers", default="0,1")
    parser.add_argument("--new-tokens", type=int, default=8)
    args = parser.parse_args(argv)
    if args.command == "build":
        print(build_tiny(args.family, args.folder[0]))
        return
    from steerer.model import chat_prompt, load_model

    layers = tuple(int(x) for x in args.layers.split(","))
    out: dict[str, list] = {}
    for folder in args.folder:
        lm = load_model(folder)
        out[folder] = []
        for text in args.prompt:
            tokens, steps = hf_trace(lm, chat_prompt(lm.tokenizer, text), layers, args.new_tokens)
            out[folder].append({"tokens": tokens,
                                "norms": [{str(k): float(v.norm()) for k, v in s.items()} for s in steps]})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
