"""The probe corpus generated on vLLM's offline engine (``--engine vllm``): the same rows, labels and onsets.

``probes.corpus.build_corpus`` plans each round and keeps, logs and stores its rows; only the sampling of the
responses is swapped. Every row of a round is submitted to one ``vllm.LLM`` engine at once and vLLM batches
them continuously (``max_num_seqs`` = the corpus batch size). Each finished response goes through the
transformers path's own ``probes.corpus.label_row``: the checker on the detokenised text, and for a
violation the task's detector over the same token prefixes, so labels and onsets cannot drift apart.

Sampling as the transformers loop: the row's temperature (0 = greedy), top-p 1, the row's seed, its token
budget, stopping at the same EOS ids (generation config and tokenizer). The stored ``token_ids`` exclude the
EOS token and ``finish_reason`` is "eos" or "length", as there. Greedy rows give the transformers loop's
tokens (fp32, tested); sampled rows are the same distribution with vLLM's random stream, not the same draws.

The engine is plain vLLM (its own model class, no steerer op): the corpus needs no taps. The fingerprint is
read from the weights vLLM loaded (``steerer.engine.vllm.weights.fingerprint``), so a corpus started on one
engine resumes on the other.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ENGINES = ("auto", "hf", "vllm")
MAX_CONTEXT = 4096  # prompt + new tokens of one row: the longest corpus row needs ~1,100 (IFEval ranges)


def context_length(path: str) -> int:
    """The model's context from its config.json, capped at ``MAX_CONTEXT`` (vLLM sizes its KV cache by it)."""
    from transformers import AutoConfig

    value = getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", None)
    return min(MAX_CONTEXT, int(value)) if value else MAX_CONTEXT


def vllm_importable() -> bool:
    """Whether ``import vllm`` works in this interpreter (what ``auto`` decides on)."""
    if importlib.util.find_spec("vllm") is None:
        return False
    try:
        import vllm  # noqa: F401
    except Exception:  # a broken install counts as absent: auto falls back to transformers
        return False
    return True


def resolve_engine(engine: str) -> str:
    """"hf" or "vllm" for ``auto|hf|vllm``: auto is vllm where it imports, else hf; vllm where it does not
    import is one line saying how to get it."""
    from steerer.engine.vllm import MISSING

    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; expected one of {list(ENGINES)}")
    if engine == "auto":
        return "vllm" if vllm_importable() else "hf"
    if engine == "vllm" and not vllm_importable():
        raise ValueError(MISSING)
    return engine


@dataclass(frozen=True)
class Generation:
    """What ``label_row`` reads of a response (as ``steerer.generation.Generation``)."""

    row: int
    tokens: list[int]
    finish_reason: str  # "eos" | "length"
    prompt_tokens: int


@dataclass
class CorpusModel:
    """What ``build_corpus`` reads of a model (``steerer.model.LoadedModel``'s name, fingerprint and
    tokenizer), without the transformers weights."""

    name: str
    fingerprint: str
    tokenizer: Any


def finished(token_ids: list[int], vllm_reason: str | None, eos: frozenset[int], prompt_tokens: int,
             row: int) -> Generation:
    """vLLM's output as the transformers loop records it: EOS dropped from the tokens, "stop" -> "eos"."""
    tokens = list(token_ids)
    stopped = vllm_reason == "stop"  # the only stop condition given is the EOS ids
    if stopped and tokens and tokens[-1] in eos:
        tokens = tokens[:-1]
    return Generation(row, tokens, "eos" if stopped else "length", prompt_tokens)


class VLLMCorpusGenerator:
    """One plain vLLM engine that samples corpus rows (``generate``) for ``build_corpus(generator=...)``.

    ``enforce_eager`` None: eager on the CPU (compiling costs minutes there), compiled on a GPU.
    ``max_model_len`` None: the model's context, at most ``MAX_CONTEXT`` (prompt + budget of a row).
    ``threads``: torch intra-op threads of the calling thread, where vLLM runs its in-process CPU worker."""

    name = "vllm"

    def __init__(self, model: str | None = None, *, batch_size: int = 48, max_model_len: int | None = None,
                 dtype: str = "float32", enforce_eager: bool | None = None, threads: int | None = None,
                 seed: int = 0, gpu_memory_utilization: float = 0.5, llm_kwargs: dict[str, Any] | None = None):
        import torch
        from transformers import AutoTokenizer
        from vllm import LLM

        from steerer.engine.vllm.driver import check_version, configure_environment, eos_ids, use_threads
        from steerer.model import DEFAULT_MODEL, resolve_model_path

        configure_environment()
        check_version()
        use_threads(threads)
        self.threads = threads
        self.path = resolve_model_path(model)
        if enforce_eager is None:
            enforce_eager = not torch.cuda.is_available()
        if max_model_len is None:
            max_model_len = context_length(self.path)
        kwargs = dict(model=self.path, dtype=dtype, enforce_eager=enforce_eager, max_model_len=max_model_len,
                      max_num_seqs=batch_size, enable_prefix_caching=True, seed=seed,
                      gpu_memory_utilization=gpu_memory_utilization)
        kwargs.update(llm_kwargs or {})
        self.llm = LLM(**kwargs)
        use_threads(threads)  # in-process engine start-up leaves its own setting behind
        self.engine = self.llm.llm_engine
        self.max_model_len = int(self.engine.model_config.max_model_len)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.eos = frozenset(eos_ids(self.path, self.tokenizer))
        self.model = CorpusModel(model or DEFAULT_MODEL, self.fingerprint(), self.tokenizer)

    def fingerprint(self) -> str:
        from steerer.engine.vllm.weights import fingerprint

        return self.llm.apply_model(fingerprint)[0]

    def sample(self, prompts: list[list[int]], rows: list[dict],
               on_finish: Callable[[Generation], None] | None = None) -> list[Generation]:
        """Every row's response (token ids in, token ids out), all rows submitted at once; in row order."""
        from vllm import SamplingParams

        from steerer.engine.vllm.driver import use_threads

        use_threads(self.threads)
        for i, (prompt, row) in enumerate(zip(prompts, rows, strict=True)):
            if len(prompt) + row["max_new_tokens"] > self.max_model_len:
                raise ValueError(f"row {row['id']}: {len(prompt)} prompt + {row['max_new_tokens']} new tokens "
                                 f"exceed the engine's max_model_len {self.max_model_len}")
            params = SamplingParams(max_tokens=row["max_new_tokens"], temperature=float(row["temperature"]),
                                    top_p=1.0, seed=int(row["seed"]), stop_token_ids=sorted(self.eos),
                                    detokenize=False)
            self.engine.add_request(f"corpus-{i}", {"prompt_token_ids": list(prompt)}, params)
        out: dict[int, Generation] = {}
        while self.engine.has_unfinished_requests():
            for output in self.engine.step():
                if output.finished:
                    i = int(output.request_id.rsplit("-", 1)[1])
                    first = output.outputs[0]
                    out[i] = finished(first.token_ids, first.finish_reason, self.eos, len(prompts[i]), i)
                    if on_finish is not None:
                        on_finish(out[i])
        return [out[i] for i in range(len(rows))]

    def generate(self, lm, rows: list[dict], capacity: int, on_row: Callable[[int, int], None] | None = None
                 ) -> list[dict]:
        """``probes.corpus.generate_rows`` on vLLM: each row sampled and labelled (``label_row``), in row order.
        ``capacity`` is the engine's ``max_num_seqs``, fixed when it was made."""
        from probes.corpus import label_row
        from steerer.model import chat_prompt

        prompts = [chat_prompt(lm.tokenizer, r["messages"]) for r in rows]
        labelled: dict[int, dict] = {}

        def label(gen: Generation) -> None:
            labelled[gen.row] = label_row(lm, rows[gen.row], gen)
            if on_row is not None:
                on_row(len(labelled), len(rows))

        self.sample(prompts, rows, label)
        return [labelled[i] for i in range(len(rows))]

    def close(self) -> None:
        """Free the engine (its memory goes with the last reference)."""
        import gc

        self.llm = self.engine = None
        gc.collect()


def open_engine(engine: str, model: str | None, *, batch_size: int = 48, threads: int | None = None,
                device: str = "auto") -> tuple[Any, Any]:
    """(model, generator) for ``build_corpus``: ``load_model`` and None (the transformers loop) for "hf";
    a ``VLLMCorpusGenerator`` and its ``CorpusModel`` for "vllm" (vLLM's platform picks the device)."""
    if resolve_engine(engine) == "hf":
        from steerer.model import load_model

        return load_model(model, threads=threads, device=device), None
    generator = VLLMCorpusGenerator(model, batch_size=batch_size, threads=threads)
    return generator.model, generator
