"""The vLLM plugin's op under CUDA graph capture: `torch.ops.steerer.layer` captured once in a
`torch.cuda.CUDAGraph`, then replayed for passes with other coefficients and other token -> slot maps,
must give what eager execution gives (steered residual and taps), exact zeros where nothing steers.

The CUDA test needs CUDA (skipped otherwise) and neither vLLM nor pytest: `scripts/gpu-check` runs it on a
GPU machine that has only torch and transformers, calling the `test_*` functions directly when pytest is
missing. On the CPU the same passes go through the path a capture takes, with the buffers' pointers checked.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from steerer.controller import SlotMap
from steerer.engine.vllm.ops import register_ops
from steerer.engine.vllm.state import STATE, UNMANAGED
from steerer.taps import LayerSteering, Where

try:
    import pytest
except ImportError:  # the GPU machine may lack pytest: scripts/gpu-check calls the tests itself
    pytest = None

REQUIRES_CUDA = "CUDA is not available: the CUDA-graph test runs on a GPU machine (scripts/gpu-check)"
needs_cuda = (pytest.mark.skipif(not torch.cuda.is_available(), reason=REQUIRES_CUDA) if pytest is not None
              else (lambda test: test))

D, CAPACITY, TOKENS = 64, 4, 12  # TOKENS: the padded token count of the captured pass (vLLM pads to a size)
STEERED, TAPPED = 0, (0, 1)


def _passes() -> list[dict]:
    """Passes on the same captured shape: other rows, other slots, other coefficients, one inactive, one
    without managed rows.
    `steered`: the tokens that get a delta (generated tokens of rows whose slot has a non-zero coefficient)."""
    first = dict(batch=3, rows=[(0, 2, 5), (1, UNMANAGED, 3), (2, 0, 6)], removed=[], moved=[],
                 positions=[7, 4, 0, 1, 2, 3, 4, 5], qsl=[0, 1, 2, 8],
                 coeffs={2: (3.0, 0.0), 0: (float("nan"), 1.0)}, steered=[0])  # slot 0: NaN, prompt tokens only
    # row 0 leaves, a new request takes it (slot 1), rows 1 and 2 swap: another token -> slot map
    second = dict(batch=3, rows=[(0, 1, 2)], removed=[0], moved=[(2, 1, True)],
                  positions=[8, 6, 7, 8, 5], qsl=[0, 1, 4, 5], coeffs={1: (-2.0, 4.0), 0: (0.5, 0.0)},
                  steered=[0, 1, 2, 3])
    third = dict(batch=3, rows=[], removed=[], moved=[], positions=[9, 3, 6], qsl=[0, 1, 2, 3], coeffs={},
                 steered=[])
    # only unmanaged rows: not live, and the replay must not reuse the previous pass's token maps
    fourth = dict(batch=3, rows=[(0, UNMANAGED, 2), (1, UNMANAGED, 2)], removed=[0, 1], moved=[],
                  positions=[3, 4, 7], qsl=[0, 1, 2, 3], coeffs={1: (1.0, 1.0)}, steered=[])
    fifth = dict(batch=3, rows=[(1, 3, 1)], removed=[1], moved=[], positions=[5, 2, 4], qsl=[0, 1, 2, 3],
                 coeffs={3: (1.0, -1.0)}, steered=[1])
    return [first, second, fourth, fifth, third]


def _set_pass(steer: LayerSteering, spec: dict, device: torch.device) -> None:
    """Apply one pass's row updates and coefficients and fill the buffers (the eager `begin_pass`)."""
    STATE.update_rows(spec["batch"], spec["removed"], spec["rows"], spec["moved"])
    coeffs = torch.zeros(CAPACITY, 2, device=device)
    for slot, values in spec["coeffs"].items():
        coeffs[slot] = torch.tensor(values, device=device)
    steer.set_coeffs(coeffs, active=bool(spec["coeffs"]))
    positions = torch.tensor(spec["positions"] + [0] * (TOKENS - len(spec["positions"])), device=device)
    STATE.begin_pass(positions, torch.tensor(spec["qsl"], device=device), num_reqs=len(spec["qsl"]) - 1)


def cuda_graph(step: Callable[[], None]) -> Callable[[], None]:
    """Capture `step` in a CUDA graph (after a warm-up on a side stream, as torch requires); its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: the first call allocates the tap buffer
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    def replay() -> None:
        graph.replay()
        torch.cuda.synchronize()

    return replay


@needs_cuda
def test_captured_op_replays_other_coefficients_and_rows_as_eager_does():
    replays_match_eager(torch.device("cuda"), cuda_graph)


def replays_match_eager(device: torch.device, capture: Callable[[Callable[[], None]], Callable[[], None]]) -> None:
    """Capture the op for the first pass with `capture`, replay it for each pass (after the eager
    `begin_pass` filled the buffers in place) and compare with eager calls on the same inputs."""
    register_ops()
    torch.manual_seed(0)
    steer = LayerSteering(torch.nn.functional.normalize(torch.randn(2, D, device=device), dim=1), Where.GENERATED)
    passes = _passes()
    saved = STATE.rows, STATE.prompt_lengths
    STATE.rows, STATE.prompt_lengths = SlotMap(), SlotMap()
    STATE.install(CAPACITY, TAPPED, {STEERED: steer}, max_tokens=TOKENS, max_rows=4, device=device)
    try:
        hidden = torch.randn(TOKENS, D, device=device)
        residual = torch.randn(TOKENS, D, device=device)

        def step() -> None:
            for layer in TAPPED:
                torch.ops.steerer.layer(hidden, residual, layer)

        _set_pass(steer, passes[0], device)
        replay = capture(step)
        buffers = STATE.buffers
        for spec in passes:
            _set_pass(steer, spec, device)
            fresh_hidden, fresh_residual = torch.randn(TOKENS, D, device=device), torch.randn(TOKENS, D, device=device)
            hidden.copy_(fresh_hidden)
            residual.copy_(fresh_residual)
            replay()
            replayed = residual.clone()
            replayed_taps = {layer: t.clone() for layer, t in STATE.captured.items()}
            eager = fresh_residual.clone()
            for layer in TAPPED:
                STATE.layer(layer, fresh_hidden, eager)
            assert STATE.buffers is buffers
            assert torch.equal(replayed, eager), spec
            assert replayed_taps.keys() == (set(TAPPED) if STATE.live else set())
            for layer in replayed_taps:
                assert torch.equal(replayed_taps[layer], STATE.captured[layer]), (spec, layer)
            untouched = torch.ones(TOKENS, dtype=torch.bool, device=device)
            untouched[spec["steered"]] = False
            assert torch.equal(replayed[untouched], fresh_residual[untouched]), spec  # exact, NaN row masked
            assert not torch.equal(replayed[~untouched], fresh_residual[~untouched]) or not spec["steered"]
            assert bool(torch.isfinite(replayed).all())
    finally:
        STATE.uninstall()
        STATE.rows, STATE.prompt_lengths = saved


def buffer_pointers() -> list[int]:
    b = STATE.buffers
    return [t.data_ptr() for t in (b.token_slot, b.last, b.taps, *b.tables.values())]


def test_op_path_a_graph_would_capture_reads_only_static_buffers_on_cpu(monkeypatch):
    """On the CPU: the path taken while capturing (forced here) gives eager's results for every pass, and
    no pass rebinds or reallocates what the op reads (same data pointers), which is what a replay needs."""
    import steerer.engine.vllm.state as state

    def capture(step: Callable[[], None]) -> Callable[[], None]:
        step()  # warm-up
        pointers = buffer_pointers()

        def replay() -> None:
            with monkeypatch.context() as patch:
                patch.setattr(state, "is_capturing", lambda tensor: True)
                step()
            assert buffer_pointers() == pointers

        return replay

    replays_match_eager(torch.device("cpu"), capture)
