"""`VLLMSteerer`'s driver inside vLLM's engine-core process: steerer on vLLM's default multiprocess engine core.

vLLM's multiprocess engine core runs its own busy loop and steps whenever it has work, so coefficients sent from
the client per step could not be tied to the pass they are for, nor a pass's taps read before the next one. In
the engine-core process they can: the executor lives there (and at tensor parallel 1 the worker too), and each
step is one call to `EngineCore.step_fn`. So the same `VLLMSteerer` loop runs there, on `CoreEngine` (what it
reads of `vllm.LLM`, backed by this engine core), hooked around vLLM's own step:

    before  the controller's coefficients for every slot (this process's op tables at TP 1; every rank's through
            the executor's `collective_rpc` at TP > 1, as the in-process driver does)
    step    vLLM's step (schedule, forward, sample)
    after   the pass's taps scored, flags settled, each row's token an event, rows ended by steerer's stop rule
            (EOS after one closing pass, or length) finished and aborted in the scheduler; each request's events
            and result ride back to the client in its `EngineCoreOutput.kv_transfer_params` (`wire.py`), which
            vLLM hands to the client's `RequestOutput` untouched; a finished one is marked finished there.

A request joins the driver when the engine core adds it (its `SamplingParams.extra_args` carry the request,
`wire.REQUEST_KEY`; the slot is written back for the op, `wire.SLOT_KEY`) and leaves when vLLM aborts it.
The client (`driver.CoreSteerer`) installs and removes the driver through two utility methods the plugin adds
to `EngineCore` in this process (`add_utilities`, from `plugin.register`, which vLLM runs here at start-up).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from typing import Any

from steerer.bank import ProbeBank
from steerer.engine.vllm.driver import VLLMSteerer
from steerer.engine.vllm.wire import (
    INSTALL,
    PAYLOAD_KEY,
    REQUEST_KEY,
    SLOT_KEY,
    UNINSTALL,
    event_to_wire,
    request_from_wire,
    result_to_wire,
)
from steerer.monitor import MonitorConfig
from steerer.request import Result, TokenEvent

HOOKED = ("step_fn", "add_request", "abort_requests")  # the engine core's members the driver wraps (instance level)


def add_utilities() -> None:
    """`EngineCore.steerer_install` / `steerer_uninstall` in vLLM's engine-core process (where vLLM has imported
    the class; elsewhere nothing). New methods only: vLLM's own behaviour changes once a client installs."""
    module = sys.modules.get("vllm.v1.engine.core")
    if module is not None and not hasattr(module.EngineCore, INSTALL):
        setattr(module.EngineCore, INSTALL, install)
        setattr(module.EngineCore, UNINSTALL, uninstall)


@dataclass
class _Tokens:
    token_ids: list[int]


@dataclass
class _Output:
    """An `EngineCoreOutput` as the driver reads a `RequestOutput` (request id, new token ids)."""

    request_id: str
    outputs: list[_Tokens]


class CoreEngine:
    """What `VLLMSteerer` reads of `vllm.LLM` and its `LLMEngine`, backed by the engine core of this process; `step`
    runs vLLM's own step and keeps its outputs for the hook to return."""

    in_core = True  # `driver.remote_workers`: the engine core is here

    def __init__(self, core: Any) -> None:
        self.core = core
        self.llm_engine = self
        self.vllm_config = core.vllm_config
        self.model_config = core.vllm_config.model_config
        self.vllm_step = core.step_fn
        # vLLM's multiprocess executor (tensor parallel, or asked for) runs the workers in processes of their own
        self.workers_elsewhere = type(core.model_executor).__name__ != "UniProcExecutor"
        self.last: tuple[dict | None, bool] = ({}, False)

    def collective_rpc(self, method: Any, timeout: float | None = None, args: tuple = (),
                       kwargs: dict[str, Any] | None = None) -> list[Any]:
        return self.core.collective_rpc(method, timeout, args, kwargs)

    def apply_model(self, func: Any) -> list[Any]:
        return self.collective_rpc("apply_model", args=(func,))

    def step(self) -> list[_Output]:
        outputs, executed = self.vllm_step()
        self.last = (outputs, executed)
        return [_Output(o.request_id, [_Tokens(list(o.new_token_ids))])
                for batch in (outputs or {}).values() for o in batch.outputs]

    def abort_request(self, request_ids: list[str]) -> None:
        type(self.core).abort_requests(self.core, request_ids)  # vLLM's own, not the hook


@dataclass
class _Installed:
    steerer: VLLMSteerer
    engine: CoreEngine


def install(core: Any, bank_folder: str, options: dict[str, Any]) -> dict[str, Any]:
    """`EngineCore.steerer_install`: a `VLLMSteerer` on this engine core with the client's bank and options, hooked
    around its step, add and abort. Returns what the client checks (the weights' fingerprint)."""
    if getattr(core, "_steerer", None) is not None:
        raise RuntimeError("another VLLMSteerer holds this vLLM engine core; close it first")
    options = dict(options)
    monitor = options.pop("monitor_config", None)
    engine = CoreEngine(core)
    steerer = VLLMSteerer(ProbeBank.load(bank_folder), llm=engine, check_bank=False,
                          monitor_config=MonitorConfig(**monitor) if monitor else None, **options)
    installed = core._steerer = _Installed(steerer, engine)
    core.step_fn = lambda: _step(installed)
    core.add_request = lambda request, request_wave=0: _add(core, installed, request, request_wave)
    core.abort_requests = lambda request_ids: _abort(core, installed, request_ids)
    return {"fingerprint": steerer.fingerprint(), "remote": steerer.remote}


def uninstall(core: Any) -> None:
    """`EngineCore.steerer_uninstall`: abort what the driver holds, release the plugin state, unhook."""
    installed = core.__dict__.pop("_steerer", None)
    if installed is None:
        return
    core.step_fn = installed.engine.vllm_step
    for name in HOOKED[1:]:
        core.__dict__.pop(name, None)
    installed.steerer.close()


def _add(core: Any, installed: _Installed, request: Any, request_wave: int) -> None:
    params = request.sampling_params
    wire = (params.extra_args or {}).get(REQUEST_KEY) if params is not None else None
    if wire is not None:  # the row is known by vLLM's (unique) request id here; the client puts its own back
        spec = replace(request_from_wire(wire), id=request.request_id)
        params.extra_args[SLOT_KEY] = installed.steerer.join(spec, request.request_id,
                                                             len(request.prompt_token_ids or ()))
    type(core).add_request(core, request, request_wave)


def _abort(core: Any, installed: _Installed, request_ids: list[str]) -> None:
    for vllm_id in request_ids:
        installed.steerer.cancel_vllm(vllm_id)
    type(core).abort_requests(core, request_ids)


def _step(installed: _Installed) -> tuple[dict | None, bool]:
    """vLLM's step wrapped by the driver's (`VLLMSteerer.step`); its events and results onto vLLM's outputs."""
    events, results = installed.steerer.step()
    outputs, executed = installed.engine.last
    installed.engine.last = ({}, False)
    return attach(outputs, events, results), executed


def attach(outputs: dict | None, events: list[TokenEvent], results: list[Result]) -> dict | None:
    """Each request's events and result into its `EngineCoreOutput` of this step (`wire.PAYLOAD_KEY`); a request
    whose result is there is marked finished, so the client frees it. One this step has no output for (none
    expected: an event or result follows a pass that sampled for the row) gets an output of its own."""
    from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason

    payloads: dict[str, dict[str, Any]] = {}
    for event in events:
        payloads.setdefault(event.request_id, {"events": [], "result": None})["events"].append(event_to_wire(event))
    for result in results:
        payloads.setdefault(result.request_id, {"events": [], "result": None})["result"] = result_to_wire(result)
    if not payloads:
        return outputs
    outputs = outputs if outputs is not None else {}
    found = {o.request_id: o for batch in outputs.values() for o in batch.outputs if o.request_id in payloads}
    for vllm_id, payload in payloads.items():  # the driver's request ids are vLLM's here (`_add`)
        output = found.get(vllm_id)
        if output is None:
            output = EngineCoreOutput(vllm_id, [])
            outputs.setdefault(0, EngineCoreOutputs()).outputs.append(output)
        output.kv_transfer_params = {PAYLOAD_KEY: payload}
        if payload["result"] is not None:
            reason = payload["result"]["finish_reason"]
            output.finish_reason = FinishReason.LENGTH if reason == "length" else FinishReason.STOP
    return outputs
