"""The backend interface: what the scheduler, `serve`, `generate` and the benchmarks drive.

Two backends implement it: `steerer.core.Steerer` (transformers) and `steerer.engine.vllm.driver.VLLMSteerer`
(vLLM's engine). A third (SGLang, say) is one new package whose class has these members and drives a
`steerer.driver.Driver` from its engine's passes. Fronts type against `Backend`, never a concrete class.

    validate(request)   ValueError for the user unless it runs on this backend's bank; idempotent and cheap
                        (a request validated once is remembered), so the RPC thread and the scheduler may
                        both call it: the scheduler's call before `admit` is the documented re-check for a
                        bank swapped in meanwhile (a new backend, which has not seen the request).
    admit(requests)     they join the running batch (all or none); results of any that ended at once
    step()              one pass for everything in flight: (token events, results it ended)
    drain()             token events produced outside `step` (a transformers prefill's first tokens)
    cancel(request_id)  drop a request in flight; False if it is not in flight
    free_slots, in_flight, capacity, bank
    close()             release the engine's taps / plugin state

`generate` and `run` (below) are the loops every backend shares on top of those members.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol, runtime_checkable

from steerer.bank import ProbeBank
from steerer.request import Request, Result, TokenEvent

__all__ = ["Backend", "generate", "run"]


@runtime_checkable
class Backend(Protocol):
    bank: ProbeBank
    capacity: int

    @property
    def in_flight(self) -> int: ...

    @property
    def free_slots(self) -> int: ...

    def validate(self, request: Request) -> None: ...

    def admit(self, requests: Iterable[Request]) -> list[Result]: ...

    def step(self) -> tuple[list[TokenEvent], list[Result]]: ...

    def drain(self) -> list[TokenEvent]: ...

    def cancel(self, request_id: str) -> bool: ...

    def close(self) -> None: ...


def generate(backend: Backend, requests: Iterable[Request], max_batch: int | None = None
             ) -> Iterator[TokenEvent | Result]:
    """Run requests to completion in shared batches (at most `max_batch` in flight), yielding token events
    and final results as they come."""
    queue = list(requests)
    max_batch = min(max_batch or backend.capacity, backend.capacity)
    while queue or backend.in_flight:
        room = min(max_batch - backend.in_flight, backend.free_slots)
        if queue and room > 0:
            admitted, queue = queue[:room], queue[room:]
            done = backend.admit(admitted)
            yield from backend.drain()
            yield from done
        events, done = backend.step()
        yield from events
        yield from done


def run(backend: Backend, requests: Iterable[Request], max_batch: int | None = None) -> list[Result]:
    """`generate`'s results only, in request order (by id; requests without ids in admission order)."""
    requests = list(requests)
    by_id = {r.request_id: r for r in generate(backend, requests, max_batch) if isinstance(r, Result)}
    order = [r.id for r in requests]
    if all(order):
        return [by_id[i] for i in order]
    return sorted(by_id.values(), key=lambda r: int(r.request_id.rsplit("-", 1)[-1]))
