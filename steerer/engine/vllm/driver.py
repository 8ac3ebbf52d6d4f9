"""`VLLMSteerer`: steerer's monitoring and per-request steering on vLLM's offline engine.

The same `Controller` as the transformers backend, driven from vLLM's step loop in this process (vLLM's
engine core in-process, one worker): before each `LLMEngine.step()` the controller writes every in-flight
slot's coefficients into the steering tables the custom op reads; after it, the taps of the rows that
completed their pass are scored, flags settle, and each row's new token becomes a `TokenEvent`.
Results are `steerer.controller.Result`, as from `Steerer`.

Tensor parallel (`tensor_parallel_size`): the ranks are worker processes (vLLM's multiprocess executor) while the
engine core stays here; the controller stays here too, sends each step's coefficients to every rank and reads
rank 0's taps back through `collective_rpc` (`ranks.py`; docs/VLLM.md, "Tensor and data parallel").

vLLM's default multiprocess engine core (`engine_core="process"`, what `steerer serve --engine vllm` uses):
`CoreSteerer`, a front that only adds requests and reads results, while this same class runs inside the
engine-core process around each of vLLM's steps (`core_side.py`); events and results come back with vLLM's outputs.

Threads: with the engine core and worker in this process, the model's kernels run on the thread that calls
`step`, with that thread's torch intra-op thread count (vLLM's own binding and thread settings apply to worker
processes it starts, not here). `threads` sets it, at start-up and again on whichever thread calls `step`
(the count is per OS thread, and vLLM's CPU worker replaces `torch.set_num_threads` with a no-op); None leaves
it. On a machine shared with other work, OpenMP threads spin-waiting for a descheduled peer make every small op
slow: use 1 there (the benchmark does).

Matching the transformers loop: a row that samples EOS is kept for one more pass so the EOS token's
residual is read (vLLM runs with `ignore_eos` and the driver stops rows itself, aborting them in vLLM);
a row stops at `max_new_tokens` recorded tokens. Steered requests carry a `cache_salt` (`salt.py`).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

import steerer.engine.vllm.ranks as ranks
from steerer import backend
from steerer.bank import ProbeBank
from steerer.driver import Driver, Options, Stop, eos_token_ids
from steerer.engine.vllm import LAYERS_KEY, VLLM_VERSION, checkpoint_architecture
from steerer.engine.vllm.state import STATE
from steerer.engine.vllm.wire import (
    INSTALL,
    PAYLOAD_KEY,
    REQUEST_KEY,
    SLOT_KEY,
    UNINSTALL,
    event_from_wire,
    request_to_wire,
    result_from_wire,
)
from steerer.lens import LensWeights
from steerer.model import chat_prompt, resolve_model_path
from steerer.monitor import MonitorConfig
from steerer.request import Request, Result, TokenEvent
from steerer.sampling import MIN_TEMPERATURE
from steerer.taps import Where

# Set before vLLM reads them (setdefault: the caller's environment wins).
ENVIRONMENT = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # engine core and worker in this process: the controller shares memory
    "VLLM_USE_V2_MODEL_RUNNER": "0",  # the V1 runner's logits-processor interface tells rows apart (rows.py)
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache on the CPU backend
    "VLLM_CPU_OMP_THREADS_BIND": "0",  # read by vLLM's multiprocess executor only; in-process, see `threads`
}


def configure_environment() -> None:
    for key, value in ENVIRONMENT.items():
        os.environ.setdefault(key, value)


_SET_NUM_THREADS = torch._C.set_num_threads  # torch.set_num_threads itself; vLLM's CPU worker replaces the latter


def use_threads(threads: int | None) -> None:
    """torch intra-op threads for the calling OS thread (through torch's own function: vLLM's CPU worker
    replaces `torch.set_num_threads` with a no-op once it has bound its threads)."""
    if threads and torch.get_num_threads() != threads:
        _SET_NUM_THREADS(threads)


def check_version() -> None:
    import vllm

    if vllm.__version__ != VLLM_VERSION:
        raise RuntimeError(f"steerer's vLLM backend is pinned to vllm {VLLM_VERSION}; found {vllm.__version__}")


@dataclass
class _Live:
    """A request in flight in vLLM: what the driver tracks on the host."""

    slot: int
    vllm_id: str
    request: Request
    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)
    outputs: int = 0  # tokens vLLM has generated for it (EOS included)
    closing: bool = False  # chose EOS: one more pass reads the EOS residual


@dataclass(frozen=True)
class VLLMOptions(Options):
    """`VLLMSteerer`'s options, and so `CoreSteerer`'s (the same class on vLLM's other engine core): declared,
    defaulted and checked here once. The constructors take them as keywords, or as `options=` with keywords over
    it. The controller's are `driver.Options`'s (capacity 64 here); the rest build vLLM's engine (ignored when a
    built `llm` is passed), except `check_bank` and `threads`.

    `model`: a checkpoint folder or name (default: the embedded default model). `dtype`, `seed`, `max_num_seqs`,
    `max_model_len`, `enforce_eager` (False: vLLM compiled): `vllm.LLM`'s. `llm_kwargs`: more for `vllm.LLM`
    (e.g. a smaller `max_num_batched_tokens` to force chunked prefill). `layers`: the decoder layers that call the
    op (default: the bank's; "all": every layer); a later bank on the same engine must use only these.
    `threads`: torch intra-op threads (see the module docstring); None leaves them as they are.
    `tensor_parallel_size` > 1: that many worker processes, reached through `collective_rpc` (module docstring).
    `engine_core`: "inproc" (default, None) or "process" (`CoreSteerer`)."""

    capacity: int = 64
    model: str | None = None
    max_num_seqs: int = 16
    dtype: str = "float32"
    enforce_eager: bool = False
    max_model_len: int = 2048
    check_bank: bool = True
    seed: int = 0
    llm_kwargs: dict[str, Any] | None = None
    layers: tuple[int, ...] | str | None = None  # any iterable of layer numbers, kept as a tuple
    threads: int | None = None
    tensor_parallel_size: int = 1
    engine_core: str | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalised once, here
        set_(self, "where", Where(self.where))
        set_(self, "monitor_config", self.monitor_config or MonitorConfig())
        if self.engine_core not in (None, "inproc", "process"):
            raise ValueError(f"engine_core must be 'inproc' or 'process', got {self.engine_core!r}")
        if self.layers is not None and self.layers != "all":
            try:
                set_(self, "layers", tuple(int(layer) for layer in self.layers))
            except (TypeError, ValueError):
                raise ValueError(f"layers must be 'all' or decoder layer numbers, got {self.layers!r}") from None

    @classmethod
    def of(cls, options: VLLMOptions | None = None, model: str | None = None, **given: Any) -> VLLMOptions:
        """`options` (default: the defaults) with the `given` keywords, and `model` unless None, over it."""
        if model is not None:
            given["model"] = model
        return replace(options, **given) if options is not None else cls(**given)

    def carried(self) -> dict[str, Any]:
        """The options a later `VLLMSteerer` on the same engine keeps (a bank swap; the engine core's own driver):
        the controller's and `threads`. The engine's belong to the engine, and the later bank is checked."""
        return {name: getattr(self, name) for name in _CARRIED}

    def to_wire(self) -> dict[str, Any]:
        """`carried()` as plain values for msgpack: what the engine core's driver is built with (`core_side.install`)."""
        return self.carried() | {"monitor_config": asdict(self.monitor_config or MonitorConfig()),
                                 "where": Where(self.where).value}


_CARRIED = (*(f.name for f in fields(Options)), "threads")


class VLLMModel:
    """What the server needs to know of the model (`steerer.model.LoadedModel`'s members it reads), from a
    running vLLM engine: no transformers model is loaded."""

    def __init__(self, steerer: VLLMSteerer, name: str | None = None):
        from steerer.model import DEFAULT_MODEL

        config = steerer.engine.model_config.hf_config
        self.tokenizer = steerer.tokenizer
        self.name = name or DEFAULT_MODEL
        self.fingerprint = steerer.fingerprint()
        self.hidden_size = int(config.hidden_size)
        self.num_layers = int(config.num_hidden_layers)
        value = getattr(config, "max_position_embeddings", None)
        self.max_positions = int(value) if value else None


class VLLMSteerer:
    """Generate with monitoring and per-request steering on vLLM: the vLLM backend (`steerer.backend.Backend`:
    `admit`, `step`, `drain`, `cancel`, `validate`, `free_slots`, `in_flight`, `bank`, `close`, as the server's
    scheduler drives them; `run`/`generate` as `Steerer`'s).

    Options: `VLLMOptions`, as keywords (`VLLMSteerer(bank, model, capacity=8, threads=1)`) or `options=`; the
    controller's as `Steerer`'s, `stop_steering_on_detection` included.
    `llm`: reuse the engine of a closed `VLLMSteerer` (a bank swap without rebuilding vLLM); engine options
    are then ignored.
    """

    options: VLLMOptions

    def __new__(cls, *args: Any, llm: Any = None, options: VLLMOptions | None = None, **given: Any) -> VLLMSteerer:
        """`CoreSteerer` (the driver in vLLM's engine-core process) for `engine_core="process"` or an `llm` built
        with vLLM's multiprocess engine core; this class (the driver in this process) otherwise."""
        core = given.get("engine_core", options.engine_core if options is not None else None)
        if cls is VLLMSteerer and uses_process_core(core, llm):  # a wrong value: `VLLMOptions` says so
            cls = CoreSteerer
        return super().__new__(cls)

    def __init__(self, bank: ProbeBank, model: str | None = None, *, llm: Any = None,
                 options: VLLMOptions | None = None, **given: Any):
        o = self._start(bank, VLLMOptions.of(options, model, **given))
        from vllm import LLM

        from steerer.engine.vllm import guard
        from steerer.engine.vllm.model import op_layers

        if STATE.installed:
            raise RuntimeError("another VLLMSteerer holds this process's vLLM plugin state; close it first")
        use_threads(o.threads)
        if llm is None:
            llm = LLM(**engine_kwargs(bank, o))
            use_threads(o.threads)  # in-process engine start-up leaves its own setting behind
        self._load(llm)
        config = self.engine.model_config.hf_config
        self.layers = op_layers(config)
        if self.layers is None:
            self.layers = frozenset(range(int(config.num_hidden_layers)))
        missing = sorted(set(bank.layers) - self.layers)
        if missing:
            raise ValueError(f"the bank uses decoder layers {missing} that this vLLM engine does not tap (built "
                             f"for {sorted(self.layers)}); start an engine for this bank")
        if o.check_bank:
            bank.check_model(self.fingerprint(), self.hidden_size)
        self.driver = Driver.build(bank, self.tokenizer, self.eos_token_ids, o, device="cpu",
                                   lens=self.lens_weights(bank))
        self.controller = self.driver.controller
        self._muted = self.controller.muted.tolist()
        self._live: dict[int, _Live] = {}  # slot -> request in flight
        self._by_vllm: dict[str, int] = {}
        self._ids = itertools.count()
        self.stats = {"passes": 0, "chunk_rows": 0, "mixed_passes": 0}  # chunked prefill seen (tests)
        scheduler = self.engine.vllm_config.scheduler_config  # the op's static buffers' sizes (state.Buffers)
        self.remote = remote_workers(self.engine)  # tensor parallel: the workers are other processes
        self.driver.can_guard = not self.remote  # the guard's logits processor reads this process's driver
        if not self.remote:
            guard.attach(guard.Hook(self.driver, self._outputs, self._temperature))
        if self.remote:  # every rank gets the directions; coefficients follow each step (`step`)
            steering = {layer: (steer.directions, steer.where.value)
                        for layer, steer in self.controller.steering.items()}
            self._seen_pass = self.llm.collective_rpc(ranks.install, args=(
                o.capacity, sorted(self.controller.tap_layers), steering, scheduler.max_num_batched_tokens,
                scheduler.max_num_seqs, self.engine.model_config.dtype))[0]
        else:
            self._seen_pass = STATE.passes
            STATE.install(o.capacity, self.controller.tap_layers, self.controller.steering,
                          max_tokens=scheduler.max_num_batched_tokens, max_rows=scheduler.max_num_seqs,
                          dtype=self.engine.model_config.dtype)

    def _start(self, bank: ProbeBank, options: VLLMOptions) -> VLLMOptions:
        """Both engine cores' first steps: the environment, the pinned vLLM and its V1 runner, steerer's models."""
        configure_environment()
        check_version()
        from steerer.engine.vllm.registry import register_models
        from steerer.engine.vllm.runner import check_v1_runner

        check_v1_runner()  # the V1 model-runner pin (runner.py): one clear line where V1 is unavailable
        register_models()
        self.bank = bank
        self.options = options
        return options

    def _load(self, llm: Any) -> None:
        """Both engine cores' view of the engine: the checkpoint's path, its tokenizer and EOS ids."""
        from transformers import AutoTokenizer

        self.llm = llm
        self.engine = llm.llm_engine
        self.path = self.engine.model_config.model
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.eos_token_ids = eos_ids(self.path, self.tokenizer)

    # -- the options ---------------------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.options.capacity

    @property
    def where(self) -> Where:
        return self.options.where

    @property
    def monitor_config(self) -> MonitorConfig:
        return self.options.monitor_config or MonitorConfig()  # never None (`VLLMOptions`)

    @property
    def threads(self) -> int | None:
        return self.options.threads

    # -- the model -------------------------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return int(self.engine.model_config.hf_config.hidden_size)

    def lens_weights(self, bank: ProbeBank) -> LensWeights | None:
        """The model's final norm and unembedding, copied out of vLLM's model, when a probe of `bank` reads the
        logit lens of the request's words (`steerer.lens`); else None."""
        from steerer.engine.vllm.weights import lens_weights

        if any(bank.lens_params) and self.engine.vllm_config.parallel_config.tensor_parallel_size > 1:
            raise ValueError("a bank whose probes read the logit lens needs tensor parallel size 1 (each rank "
                             "holds a slice of the unembedding)")
        return self.llm.apply_model(lens_weights)[0] if any(bank.lens_params) else None

    def fingerprint(self) -> str:
        """The loaded weights' steerer fingerprint (what a bank is checked against)."""
        from steerer.engine.vllm.weights import fingerprint

        return self.llm.apply_model(fingerprint)[0]

    def close(self) -> None:
        """Abort what is in flight (the engine stays usable: `VLLMSteerer(bank, llm=old.llm)`) and release the
        plugin state."""
        ids = [live.vllm_id for live in self._live.values()]
        self._live.clear()
        self._by_vllm.clear()
        if ids:
            self.engine.abort_request(ids)
        if self.remote:
            self.llm.collective_rpc(ranks.uninstall)
        else:
            from steerer.engine.vllm import guard

            guard.detach(self.driver)
            STATE.uninstall()

    def __enter__(self) -> VLLMSteerer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def in_flight(self) -> int:
        return len(self._live)

    @property
    def free_slots(self) -> int:
        return self.driver.free_slots

    # -- requests ----------------------------------------------------------------------------------------------
    def salt(self, request: Request) -> str | None:
        from steerer.engine.vllm.salt import cache_salt

        return cache_salt(request, self.bank, self._muted, self.where.value, self.monitor_config)

    def validate(self, request: Request) -> None:
        """Raise ValueError (with a message for the user) if the request cannot run on this bank (once per
        request: `admit` does not repeat it)."""
        self.driver.validate(request)

    def drain(self) -> list[TokenEvent]:
        """Events produced outside `step` (none here: prefill happens inside vLLM's steps)."""
        return []

    def admit(self, requests: Iterable[Request]) -> list[Result]:
        """Validate and hand requests to vLLM's scheduler; they join its running batch at the next step.
        Returns the requests that finished at once (none: vLLM prefills them within `step`)."""
        requests = list(requests)
        stops = [self._stop(r) for r in requests]
        slots = self.driver.join_all(requests, stops)  # validated there (sampling included), all or none
        for request, slot in zip(requests, slots, strict=True):
            prompt = self._prompt(request)
            vllm_id = f"steerer-{next(self._ids)}"
            self.engine.add_request(vllm_id, prompt, vllm_sampling(request, {SLOT_KEY: slot}))
            self._track(slot, vllm_id, request, len(prompt["prompt_token_ids"]))
        return []

    def join(self, request: Request, vllm_id: str, prompt_tokens: int) -> int:
        """A request vLLM already holds (the engine core's own, `core_side.py`) joins the driver: its slot.
        Validated by the front that sent it, against the same bank."""
        slot = self.driver.join(request, request.id, self._stop(request), validated=True)
        self._track(slot, vllm_id, request, prompt_tokens)
        return slot

    def _stop(self, request: Request) -> Stop:
        """vLLM runs with ignore_eos; the driver's stop rule ends rows (EOS, then one closing pass; or length)."""
        return Stop(frozenset(self.eos_token_ids), request.sampling.max_new_tokens, request.sampling.ignore_eos)

    def _prompt(self, request: Request) -> dict[str, Any]:
        """vLLM's prompt: the chat template's token ids, and the steering configuration's `cache_salt`."""
        prompt: dict[str, Any] = {"prompt_token_ids": chat_prompt(self.tokenizer, request.prompt, request.system)}
        salt = self.salt(request)
        if salt is not None:
            prompt["cache_salt"] = salt
        return prompt

    def _track(self, slot: int, vllm_id: str, request: Request, prompt_tokens: int) -> None:
        self._live[slot] = _Live(slot, vllm_id, request, prompt_tokens)
        self._by_vllm[vllm_id] = slot

    def cancel_vllm(self, vllm_id: str) -> bool:
        """`cancel` by vLLM's request id (vLLM aborted it: `core_side.py`)."""
        slot = self._by_vllm.get(vllm_id)
        if slot is None:
            return False
        self._drop(slot)
        self.driver.leave(slot)
        return True

    def cancel(self, request_id: str) -> bool:
        slot = self.driver.slot_of(request_id)
        if slot is None or slot not in self._live:
            return False
        self._drop(slot)
        self.driver.leave(slot)
        return True

    def step(self) -> tuple[list[TokenEvent], list[Result]]:
        """One vLLM step (one forward pass over what its scheduler picked): token events and finished results."""
        use_threads(self.threads)  # per OS thread: the server steps from its scheduler thread
        self.driver.before_slots()  # every in-flight slot's alphas; the op gathers rows by slot
        if self.remote and self._live:  # the same alphas on every rank
            self.llm.collective_rpc(ranks.set_coefficients, args=(
                {layer: (steer.coeffs, steer.active) for layer, steer in self.controller.steering.items()},))
        outputs = self.engine.step()
        return self._read(outputs)

    def generate(self, requests: Iterable[Request], max_batch: int | None = None) -> Iterator[TokenEvent | Result]:
        """Run requests to completion, admitting up to `max_batch` at a time; yield events and results."""
        return backend.generate(self, requests, max_batch)

    def run(self, requests: Iterable[Request], max_batch: int | None = None) -> list[Result]:
        return backend.run(self, requests, max_batch)

    # -- internals -------------------------------------------------------------------------------------------
    def _read(self, outputs) -> tuple[list[TokenEvent], list[Result]]:
        new_tokens: dict[int, list[int]] = {}
        for output in outputs:
            slot = self._by_vllm.get(output.request_id)
            if slot is not None and output.outputs and output.outputs[0].token_ids:
                new_tokens[slot] = list(output.outputs[0].token_ids)
        info, captured = self._last_pass()
        if info is None or info.number == self._seen_pass:
            if new_tokens:
                raise RuntimeError("steerer: vLLM produced tokens without a pass the plugin saw")
            return [], []
        self._seen_pass = info.number
        picked, slots, index, closing = [], [], [], []
        chunks = decoding = 0
        for row, slot in enumerate(info.slots):
            if slot < 0 or slot not in self._live:
                continue
            if not info.complete(row, self._live[slot].outputs):  # a prefill chunk, or a chunk of a recompute
                chunks += 1  # after preemption, that stops short of the row's last token: no token
                continue
            decoding += info.last_positions[row] >= info.prompt_lengths[row]
            picked.append(row)
            slots.append(slot)
            index.append(info.last_positions[row] - info.prompt_lengths[row])
            closing.append(self._live[slot].closing)
        self.stats["passes"] += 1
        self.stats["chunk_rows"] += chunks
        self.stats["mixed_passes"] += bool(chunks and decoding)
        expected = {s for s, c in zip(slots, closing, strict=True) if not c}
        if set(new_tokens) - set(slots) or expected - set(new_tokens):
            raise RuntimeError(f"steerer: rows that completed a pass {sorted(expected)} and requests with new "
                               f"tokens {sorted(new_tokens)} differ; vLLM's batch layout moved")
        for slot, tokens in new_tokens.items():
            self._live[slot].outputs += len(tokens)
        if not picked:
            return [], []
        rows = torch.tensor(picked)
        residuals = {layer: captured[layer][rows] for layer in self.controller.tap_layers}
        self.driver.read(slots, index, residuals, closing)
        events, results = [], []
        for slot, is_closing in zip(slots, closing, strict=True):
            live = self._live[slot]
            if is_closing:  # the EOS residual is read: the row ends
                results.append(self._finish(slot))
                continue
            (token,) = new_tokens[slot][-1:]  # one sampled token per completed pass (no speculative decoding)
            events.append(self.driver.token(slot, token))  # the row's stop rule decides EOS and length
            ending = self.driver.ending(slot)
            if ending != "eos":
                live.tokens.append(token)
            if ending == "eos":
                live.closing = True  # one more pass reads the EOS token's residual
            elif ending == "length":
                results.append(self._finish(slot))
        return events, results

    def _outputs(self, slot: int) -> int | None:
        """For the guard: the tokens vLLM has generated for the slot's request (None: not in flight, or
        closing: it chose EOS and its last pass only reads that residual)."""
        live = self._live.get(slot)
        return None if live is None or live.closing else live.outputs

    def _temperature(self, slot: int) -> float:
        """For the guard: the slot's temperature as vLLM samples it (0: greedy, as `admit` sends it)."""
        temperature = self._live[slot].request.sampling.temperature
        return 0.0 if temperature < MIN_TEMPERATURE else temperature

    def _last_pass(self) -> tuple[Any, dict[int, torch.Tensor]]:
        """The latest pass and its taps: this process's `STATE`, or rank 0's (one `collective_rpc`)."""
        if not self.remote:
            return STATE.last_pass(), STATE.captured
        reply = self.llm.collective_rpc(ranks.last_pass)[0]
        return (None, {}) if reply is None else reply

    def _finish(self, slot: int) -> Result:
        live = self._live[slot]
        self._drop(slot)
        return self.driver.finish(slot, None, live.prompt_tokens, live.tokens)

    def _drop(self, slot: int) -> None:
        live = self._live.pop(slot)
        self._by_vllm.pop(live.vllm_id, None)
        self.engine.abort_request([live.vllm_id])


class CoreSteerer(VLLMSteerer):
    """`VLLMSteerer` on vLLM's default multiprocess engine core: the driver runs inside the engine-core process
    (`core_side.py`), around each of vLLM's own steps, and this front only adds requests and reads what each step
    sent back. Same members, options and results as the in-process driver; built by `VLLMSteerer(...,
    engine_core="process")` (or an `llm` built with the multiprocess core). Not here: `stats`, `controller`,
    `driver` (they live in the engine core), and the guard at tensor parallel > 1 (as in-process)."""

    def __init__(self, bank: ProbeBank, model: str | None = None, *, llm: Any = None,
                 options: VLLMOptions | None = None, **given: Any):
        o = self._start(bank, VLLMOptions.of(options, model, **given))
        from vllm import LLM

        if llm is None:
            kwargs = engine_kwargs(bank, o)
            if o.tensor_parallel_size == 1:  # the worker in the engine-core process, beside the driver (and guard)
                kwargs.setdefault("distributed_executor_backend", "uni")
            if os.environ["VLLM_CPU_OMP_THREADS_BIND"] == ENVIRONMENT["VLLM_CPU_OMP_THREADS_BIND"]:
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"  # threads: the core's own (`threads`)
            with process_core():
                llm = LLM(**kwargs)
        if not uses_process_core(None, llm):
            raise RuntimeError("vLLM started its engine core in this process (VLLM_ENABLE_V1_MULTIPROCESSING was "
                               "read as 0 earlier in this process); use engine_core='inproc' here")
        self._load(llm)
        self._muted = bank.muted(o.use_unreliable_probes).tolist()
        self._live: dict[str, str] = {}  # vLLM's request id -> the request's id (events and results carry it)
        self._ids = itertools.count()
        self._names = itertools.count()
        with tempfile.TemporaryDirectory(prefix="steerer-bank-") as tmp:  # msgpack carries no ProbeBank: a folder
            reply = self._utility(INSTALL, str(bank.save(Path(tmp) / "bank")), o.to_wire())
        self._fingerprint = reply["fingerprint"]
        self.remote = reply["remote"]  # the workers are processes of their own (the guard needs them local)
        if o.check_bank:
            try:
                bank.check_model(self._fingerprint, self.hidden_size)
            except Exception:
                self.close()
                raise

    def _utility(self, method: str, *args: Any) -> Any:
        """A call to the engine core's steerer method (`core_side.py`); its failure as one line, ValueError."""
        try:
            return self.engine.engine_core.call_utility(method, *args)
        except Exception as exc:  # vLLM returns a failed utility call as Exception("Call to ... failed: <why>")
            message = str(exc)
            raise ValueError(message.partition("failed: ")[2] or message) from None

    def fingerprint(self) -> str:
        return self._fingerprint

    def lens_weights(self, bank: ProbeBank) -> LensWeights | None:
        raise NotImplementedError("the lens weights live in vLLM's engine-core process (core_side.py)")

    def close(self) -> None:
        if self._live:
            self.engine.abort_request(list(self._live))
            self._live.clear()
        self._utility(UNINSTALL)

    @property
    def in_flight(self) -> int:
        return len(self._live)

    @property
    def free_slots(self) -> int:
        return self.capacity - len(self._live)

    def validate(self, request: Request) -> None:
        """As `Driver.validate` (the engine core's driver joins what this front validated)."""
        from steerer.constraints import validate_request
        from steerer.guard import guarded_tasks
        from steerer.policy import check_strengths

        validate_request(request, self.bank.tasks)
        check_strengths(request, self.bank)
        if self.remote and (guarded := guarded_tasks(request)):
            raise ValueError(f"this engine cannot guard ({', '.join(guarded)}): the guard vets tokens in the process "
                             "that samples them, and vLLM's workers run in their own here (at tensor parallel 1 use "
                             "vLLM's engine core in-process: serve --engine-core inproc; docs/GUARD.md)")

    def admit(self, requests: Iterable[Request]) -> list[Result]:
        requests = list(requests)
        if len(requests) > self.free_slots:
            raise RuntimeError(f"only {self.free_slots} free slots for {len(requests)} requests")
        for request in requests:
            self.validate(request)
        for request in requests:
            request_id = request.id or f"req-{next(self._names)}"
            vllm_id = f"steerer-{next(self._ids)}"
            params = vllm_sampling(request, {REQUEST_KEY: request_to_wire(request, request_id)})
            self.engine.add_request(vllm_id, self._prompt(request), params)
            self._live[vllm_id] = request_id
        return []

    def cancel(self, request_id: str) -> bool:
        vllm_id = next((v for v, r in self._live.items() if r == request_id), None)
        if vllm_id is None:
            return False
        del self._live[vllm_id]
        self.engine.abort_request([vllm_id])  # the engine core's driver drops the row (`core_side._abort`)
        return True

    def step(self) -> tuple[list[TokenEvent], list[Result]]:
        """The engine core's next step that sent outputs: the token events and results its driver attached."""
        events: list[TokenEvent] = []
        results: list[Result] = []
        for output in self.engine.step():
            if output.request_id not in self._live:
                continue
            payload = (output.kv_transfer_params or {}).get(PAYLOAD_KEY)
            request_id = self._live[output.request_id]  # the core knows the row by vLLM's id
            if payload is not None:
                events.extend(replace(event_from_wire(e), request_id=request_id) for e in payload["events"])
                if payload["result"] is not None:
                    results.append(replace(result_from_wire(payload["result"]), request_id=request_id))
                    del self._live[output.request_id]
                    continue
            if output.finished:
                del self._live[output.request_id]
                raise RuntimeError(f"steerer: vLLM's engine core ended request {request_id} without its result")
        return events, results


def uses_process_core(engine_core: str | None, llm: Any) -> bool:
    """Whether the driver runs in vLLM's engine-core process: `llm`'s core is another process, or (no `llm`)
    `engine_core` is "process". Default "inproc": the engine core and driver in this process (`VLLMOptions` checks
    the value)."""
    if llm is not None:
        engine = llm.llm_engine
        return not getattr(engine, "in_core", False) and type(engine.engine_core).__name__ != "InprocClient"
    return engine_core == "process"


@contextlib.contextmanager
def process_core() -> Iterator[None]:
    """vLLM's multiprocess engine core for the engine built inside (the module's environment asks in-process)."""
    key = "VLLM_ENABLE_V1_MULTIPROCESSING"
    before = os.environ.get(key)
    os.environ[key] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def engine_kwargs(bank: ProbeBank, o: VLLMOptions) -> dict[str, Any]:
    """`vllm.LLM`'s arguments for a steerer engine: the checkpoint's `Steerer<Arch>`, the op at `o.layers` (default
    the bank's; "all": every layer), steerer's logits processors, prefix caching, no async scheduling."""
    from steerer.engine.vllm.guard import SteererGuard
    from steerer.engine.vllm.rows import SteererRows

    path = resolve_model_path(o.model)
    overrides: dict[str, Any] = {"architectures": [checkpoint_architecture(path)]}  # its family's
    if o.layers != "all":  # without the key every decoder layer calls the op
        overrides[LAYERS_KEY] = sorted({int(layer) for layer in (bank.layers if o.layers is None else o.layers)})
    kwargs = dict(model=path, gpu_memory_utilization=0.3, enable_prefix_caching=True, async_scheduling=False,
                  hf_overrides=overrides, logits_processors=[SteererRows, SteererGuard], dtype=o.dtype, seed=o.seed,
                  enforce_eager=o.enforce_eager, max_model_len=o.max_model_len, max_num_seqs=o.max_num_seqs)
    if o.tensor_parallel_size > 1:  # worker processes (vLLM's multiprocess executor); see `remote_workers`
        kwargs.update(tensor_parallel_size=o.tensor_parallel_size, distributed_executor_backend="mp")
        if os.environ["VLLM_CPU_OMP_THREADS_BIND"] == ENVIRONMENT["VLLM_CPU_OMP_THREADS_BIND"]:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"  # one core list for several ranks fails
    kwargs.update(o.llm_kwargs or {})
    return kwargs


def vllm_sampling(request: Request, extra_args: dict[str, Any]):
    """vLLM's `SamplingParams` for a request: one token past the budget and `ignore_eos` (the driver's stop rule
    ends rows), greedy as temperature 0, token ids only (DELTA outputs), steerer's `extra_args`."""
    from vllm import SamplingParams as VLLMSampling
    from vllm.sampling_params import RequestOutputKind

    sampling = request.sampling
    greedy = sampling.temperature < MIN_TEMPERATURE
    return VLLMSampling(max_tokens=sampling.max_new_tokens + 1, ignore_eos=True,
                        temperature=0.0 if greedy else sampling.temperature,
                        top_p=1.0 if greedy else sampling.top_p, seed=None if greedy else sampling.seed,
                        output_kind=RequestOutputKind.DELTA, detokenize=False, extra_args=extra_args)


def remote_workers(engine) -> bool:
    """Whether the workers run in other processes (tensor parallel through vLLM's multiprocess executor), so the
    driver reaches their `STATE` through `collective_rpc` (`ranks.py`). The engine core must be in this process:
    vLLM's multiprocess engine core steps on its own, so coefficients sent per step could not precede their pass."""
    parallel = engine.vllm_config.parallel_config
    if parallel.pipeline_parallel_size != 1:
        raise RuntimeError("steerer's vLLM driver runs at pipeline parallel size 1 (tensor parallel is supported)")
    if getattr(engine, "in_core", False):  # the driver inside vLLM's engine-core process (core_side.py)
        return engine.workers_elsewhere
    if type(engine.engine_core).__name__ != "InprocClient":
        raise RuntimeError("steerer's vLLM driver needs vLLM's engine core in its process: set "
                           "VLLM_ENABLE_V1_MULTIPROCESSING=0 (for `vllm serve`, use the serve plugin)")
    return parallel.tensor_parallel_size > 1


def eos_ids(path: str, tokenizer) -> tuple[int, ...]:
    """The generation config's EOS ids and the tokenizer's (the one rule: `steerer.driver.eos_token_ids`)."""
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:
        eos = None
    return eos_token_ids(eos, tokenizer.eos_token_id)


def scheduler_factory(first: VLLMSteerer) -> Callable[[ProbeBank], VLLMSteerer]:
    """`steerer_factory` for the server's scheduler: the first call hands over `first`; later ones (a bank
    swap, a restart after a failed pass) build a `VLLMSteerer` on the same vLLM engine with the same options."""
    pending = [first]
    options = first.options.carried()

    def make(bank: ProbeBank) -> VLLMSteerer:
        if pending and pending[0].bank is bank:
            return pending.pop()
        pending.clear()
        return VLLMSteerer(bank, llm=first.llm, **options)

    return make
