"""Start-up of the `vllm serve` plugin: what is checked before the engine starts, and process lifetime.

Checks. vLLM calls a per-architecture hook (`MODELS_CONFIG_MAP[arch].verify_and_update_config`) while it builds
its config, in the API server, before any engine process starts or `/health` answers. `register_checks`
(from the plugin's `register()`) installs `StartupCheck` there for every `Steerer<Arch>`, which
  - refuses, always, a checkpoint whose family the override does not implement (a Qwen2 checkpoint under
    `SteererLlamaForCausalLM` would otherwise run as Llama, its biases dropped, silently); the line names the
    right override, or lists the supported architectures (`SUPPORTED`) where none fits;
  - under the serve plugin (`SteererServe` among the logits processors), checks the bank (`STEERER_BANK`)
    against the checkpoint: loadable, hidden size, the layers it uses, and the weights' fingerprint (read
    from the checkpoint's safetensors, so before anything loads). On a mismatch the server either exits with
    one line (default) or, with `STEERER_ON_BANK_MISMATCH=off`, starts with steerer off and serves plain
    traffic (requests naming steerer keys get HTTP 400 with the reason; `OFF_REASON` carries it to the
    engine's processes).
Under the serve plugin a refusal is `SystemExit(line)`: Python prints the line alone and exits 1. In a
library (the offline driver, `vllm.LLM`) it is a ValueError.

Lifetime. vLLM's engine core and workers are child processes; `kill -9` of the API server used to orphan
them, and the orphaned worker kept the metrics port. `die_with_parent` asks the kernel to SIGKILL a child
when its parent dies (prctl PR_SET_PDEATHSIG), in every spawned vLLM process (`register()` runs there) and,
under the serve plugin, in every forked one (`os.register_at_fork`).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import multiprocessing
import os
import signal
import sys
import time

from steerer.bank import BankError, ProbeBank
from steerer.engine.vllm import (
    ARCHITECTURE,
    FAMILIES,
    LAYERS_KEY,
    STEERER_ARCHITECTURES,
    family_of,
    steerer_architecture,
    unsupported,
)

# model_type of a checkpoint -> the architecture steerer wraps on vLLM for it (`FAMILIES`)
SUPPORTED = {model_type: arch for arch, family in FAMILIES.items() for model_type in family.model_types}
SERVE_PROCESSOR = "steerer.engine.vllm.serve_plugin:SteererServe"
BANK_ENV = "STEERER_BANK"
ON_MISMATCH_ENV = "STEERER_ON_BANK_MISMATCH"  # "exit" (default) | "off"
ON_MISMATCH = ("exit", "off")
OFF_REASON = "STEERER_OFF_REASON"  # set by the check (API server) for itself and the engine's processes
PR_SET_PDEATHSIG = 1

log = logging.getLogger("vllm.steerer")


@functools.cache
def load_bank() -> ProbeBank:
    """The bank this process serves (`STEERER_BANK`, default: the packaged one), loaded once."""
    return ProbeBank.load(os.environ.get(BANK_ENV) or None)


def off_reason() -> str | None:
    """Why steerer is off in this server (the start-up check found a bank that does not fit), or None."""
    return os.environ.get(OFF_REASON) or None


def on_mismatch() -> str:
    mode = os.environ.get(ON_MISMATCH_ENV, "exit").strip().lower() or "exit"
    if mode not in ON_MISMATCH:
        raise SystemExit(f"steerer: {ON_MISMATCH_ENV}={mode!r}; choose {' or '.join(ON_MISMATCH)}")
    return mode


# -- checks (pure: a config in, a message or None out) ---------------------------------------------------------------
def architecture_problem(hf_config, architecture: str = ARCHITECTURE) -> str | None:
    """Why `architecture` (a `Steerer<Arch>`) must not load this checkpoint (another family), or None."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type in family_of(architecture).model_types:
        return None
    name = _architecture_name(model_type)
    where = f"{architecture} implements {STEERER_ARCHITECTURES[architecture]} only; this checkpoint is {name} " \
            f"(model_type {model_type!r})"
    try:
        right = steerer_architecture([name], model_type)
    except ValueError:
        return f"{where}: {unsupported(name)}"
    return (f"{where}, which it would run with wrong outputs: load it as {right} "
            f"(--hf-overrides '{{\"architectures\": [\"{right}\"]}}')")


def engine_architecture(model_config) -> str:
    """The `Steerer<Arch>` an engine loads (from its overridden `architectures`)."""
    return next((a for a in getattr(model_config, "architectures", None) or () if a in STEERER_ARCHITECTURES),
                ARCHITECTURE)


def _architecture_name(model_type: str | None) -> str:
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, "an unknown architecture")
    except ImportError:
        return "an unknown architecture"


def bank_problem(bank: ProbeBank | None, hf_config, fingerprint: str | None, error: str | None = None) -> str | None:
    """Why `bank` cannot serve the model of `hf_config` (hidden size, layers, fingerprint), or None.
    `fingerprint` None: not readable before loading (checked at the first request instead)."""
    if bank is None:
        return error or "no probe bank"
    where = f"bank {bank.version} ({bank.model})"
    if bank.hidden_size != hf_config.hidden_size:
        return f"{where} is for hidden size {bank.hidden_size}; the model has {hf_config.hidden_size}"
    layers = getattr(hf_config, LAYERS_KEY, None)
    available = set(range(hf_config.num_hidden_layers)) if layers is None else {int(x) for x in layers}
    missing = sorted(set(bank.layers) - available)
    if missing:
        return f"{where} uses decoder layers {missing}, which this model lacks or calls no steerer op at"
    if fingerprint is not None and fingerprint != bank.fingerprint:
        return (f"{where} was trained on another model (fingerprint {bank.fingerprint}); this model's "
                f"fingerprint is {fingerprint}")
    return None


def serving(model_config) -> bool:
    """Whether this engine runs the `vllm serve` plugin (`SteererServe` among its logits processors)."""
    for processor in getattr(model_config, "logits_processors", None) or ():
        name = processor if isinstance(processor, str) else f"{processor.__module__}:{processor.__qualname__}"
        if name.replace(".SteererServe", ":SteererServe") == SERVE_PROCESSOR:
            return True
    return False


def startup_problem(model_config) -> str | None:
    """The bank check for an engine's config: load the bank, read the checkpoint's fingerprint, compare."""
    from steerer.engine.vllm.weights import checkpoint_fingerprint

    try:
        bank = load_bank()
    except BankError as exc:
        return bank_problem(None, model_config.hf_config, None, str(exc))
    return bank_problem(bank, model_config.hf_config, checkpoint_fingerprint(model_config.model,
                                                                             model_config.hf_config))


# -- the hook vLLM calls --------------------------------------------------------------------------------------------
def register_checks() -> None:
    """Install `StartupCheck` as vLLM's config hook of every `Steerer<Arch>` (idempotent)."""
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    for architecture in STEERER_ARCHITECTURES:
        MODELS_CONFIG_MAP.setdefault(architecture, _startup_check_class())


@functools.cache
def _startup_check_class() -> type:
    from vllm.model_executor.models.config import VerifyAndUpdateConfig

    class StartupCheck(VerifyAndUpdateConfig):
        """vLLM's per-architecture config hook: see the module docstring."""

        @staticmethod
        def verify_and_update_config(vllm_config) -> None:
            check_engine(vllm_config.model_config)

    return StartupCheck


def check_engine(model_config) -> None:
    """Refuse an unsupported architecture; under the serve plugin, check the bank (exit, or steerer off)."""
    served = serving(model_config)
    problem = architecture_problem(model_config.hf_config, engine_architecture(model_config))
    if problem is not None:
        if served:
            raise SystemExit(f"steerer: {problem}")
        raise ValueError(problem)
    if not served:
        return
    mode = on_mismatch()
    problem = startup_problem(model_config)
    if problem is None:
        os.environ.pop(OFF_REASON, None)
    elif mode == "off":
        os.environ[OFF_REASON] = problem  # inherited by the engine core and workers started after this
        log.warning("steerer: off, serving plain traffic only: %s", problem)
    else:
        raise SystemExit(f"steerer: {problem} ({ON_MISMATCH_ENV}=off serves plain traffic with steerer off)")
    global _fork_hook
    if not _fork_hook:  # once per process
        os.register_at_fork(after_in_child=die_with_parent)
        _fork_hook = True


_fork_hook = False


# -- process lifetime -------------------------------------------------------------------------------------------
def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux; elsewhere a no-op). If the parent is
    already gone (it died before this ran), exit now."""
    if not sys.platform.startswith("linux"):
        return
    spawner = multiprocessing.parent_process()  # None right after os.fork (set later by multiprocessing)
    parent = os.getppid() if spawner is None or spawner.pid is None else spawner.pid
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        os._exit(1)


def in_child_process() -> bool:
    """Whether this process was started by `multiprocessing` (vLLM's engine core and workers are)."""
    return multiprocessing.parent_process() is not None



# -- metrics endpoint --------------------------------------------------------------------------------------------
METRICS_PORT_ENV, METRICS_HOST_ENV = "STEERER_METRICS_PORT", "STEERER_METRICS_HOST"
BIND_RETRY_S = 10.0  # how long a taken metrics port is retried (a previous server's worker on its way out)


def serve_metrics(metrics, offset: int = 0) -> int | None:
    """Serve `metrics` on STEERER_METRICS_PORT + `offset` at STEERER_METRICS_HOST (default 127.0.0.1); the bound
    port, or None (not configured, or still taken after `BIND_RETRY_S`: logged, serving goes on without it).
    The server sets SO_REUSEADDR (prometheus_client's), so a restart never waits for TIME_WAIT."""
    port, host = os.environ.get(METRICS_PORT_ENV), os.environ.get(METRICS_HOST_ENV, "127.0.0.1")
    if not port:
        return None
    deadline = time.monotonic() + BIND_RETRY_S
    while True:
        try:
            bound = metrics.serve(int(port) + offset, host)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE and time.monotonic() < deadline:
                time.sleep(0.2)  # retry interval
                continue
            log.error("steerer: cannot serve metrics on %s:%s (%s); serving without them", host, port, exc)
            return None
        except ValueError as exc:
            log.error("steerer: cannot serve metrics on %s:%s (%s); serving without them", host, port, exc)
            return None
        log.info("steerer: metrics on http://%s:%d/metrics", host, bound)
        return bound
