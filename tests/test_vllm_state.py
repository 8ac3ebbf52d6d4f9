"""The vLLM plugin's worker-side state without vLLM: rows -> slots, token maps of a mixed pass, steering
exactly zero for rows that do not steer, taps at each row's last token. Runs in the main CI."""

from __future__ import annotations

import subprocess
import sys
from importlib.util import find_spec

import pytest
import torch

from steerer.engine.vllm.salt import cache_salt
from steerer.engine.vllm.state import UNMANAGED, WorkerState
from steerer.taps import LayerSteering, Where

D = 8


def _state(where: Where = Where.GENERATED) -> tuple[WorkerState, LayerSteering]:
    torch.manual_seed(0)
    dirs = torch.nn.functional.normalize(torch.randn(2, D), dim=1)
    steer = LayerSteering(dirs, where)
    state = WorkerState()
    state.install(4, (1, 2), {1: steer})
    return state, steer


def test_mixed_pass_steers_generated_tokens_of_steered_rows_only_and_taps_last_tokens():
    state, steer = _state()
    # rows: 0 = slot 2 (prompt 5, decoding), 1 = unmanaged (prompt 3), 2 = slot 0 (prompt 6, a prefill chunk)
    state.update_rows(3, [], [(0, 2, 5), (1, UNMANAGED, 3), (2, 0, 6)], [])
    coeffs = torch.zeros(4, 2)
    coeffs[2] = torch.tensor([3.0, 0.0])
    coeffs[0] = torch.tensor([5.0, 1.0])
    steer.set_coeffs(coeffs, active=True)
    positions = torch.tensor([7, 4, 0, 1, 2, 3, 4, 5, 9, 9])  # 1 decode token, 1 decode token, 6 prompt tokens, 2 pad
    qsl = torch.tensor([0, 1, 2, 8])
    state.begin_pass(positions, qsl, num_reqs=3)
    hidden = torch.randn(10, D)
    residual = torch.randn(10, D)
    before = residual.clone()
    state.layer(1, hidden, residual)
    added = residual - before
    torch.testing.assert_close(added[0], 3.0 * steer.directions[0])  # slot 2, generated token
    assert torch.equal(residual[1:], before[1:])  # unmanaged row, prompt tokens of slot 0, padding: untouched
    state.layer(2, hidden, residual)
    assert set(state.captured) == {1, 2}
    torch.testing.assert_close(state.captured[2], hidden[[0, 1, 7]] + residual[[0, 1, 7]])
    info = state.last_pass()
    assert info.slots == [2, UNMANAGED, 0]
    assert [info.complete(r) for r in range(3)] == [True, True, True]
    assert info.last_positions == [7, 4, 5]


def test_partial_prefill_chunk_is_not_complete_and_where_prompt_covers_prompt_tokens():
    state, steer = _state(Where.PROMPT)
    state.update_rows(1, [], [(0, 1, 10)], [])
    coeffs = torch.zeros(4, 2)
    coeffs[1, 1] = 2.0
    steer.set_coeffs(coeffs, active=True)
    state.begin_pass(torch.arange(4), torch.tensor([0, 4]), num_reqs=1)
    residual = torch.zeros(4, D)
    state.layer(1, torch.zeros(4, D), residual)
    torch.testing.assert_close(residual, (2.0 * steer.directions[1]).expand(4, D))
    assert not state.last_pass().complete(0)


def test_rows_follow_removes_moves_and_swaps():
    state, _ = _state()
    state.update_rows(3, [], [(0, 0, 4), (1, 1, 5), (2, 2, 6)], [])
    state.update_rows(2, [0], [], [(2, 0, False)])  # row 0 leaves, row 2 moves into it
    assert state.rows.slots == [2, 1] and state.prompt_lengths.slots == [6, 5]
    state.update_rows(2, [], [], [(0, 1, True)])
    assert state.rows.slots == [1, 2]
    with pytest.raises(RuntimeError, match="BatchUpdate"):
        state.update_rows(3, [], [], [])


def test_row_count_mismatch_fails_loudly_and_plain_passes_are_not_live():
    state, _ = _state()
    state.begin_pass(torch.arange(3), torch.tensor([0, 3]), num_reqs=1)
    assert not state.live  # no rows tracked: profiling / warm-up
    state.update_rows(1, [], [(0, UNMANAGED, 3)], [])
    state.begin_pass(torch.arange(3), torch.tensor([0, 3]), num_reqs=1)
    assert not state.live  # no managed row: nothing to do
    state.update_rows(2, [], [(1, 0, 3)], [])
    with pytest.raises(RuntimeError, match="batch layout"):
        state.begin_pass(torch.arange(3), torch.tensor([0, 1, 3]), num_reqs=3)


def test_nan_direction_never_reaches_rows_without_steering():
    state, steer = _state(Where.BOTH)
    steer.directions[1] = float("nan")
    state.update_rows(2, [], [(0, 0, 2), (1, 1, 2)], [])
    coeffs = torch.zeros(4, 2)
    coeffs[1, 1] = 1.0
    steer.set_coeffs(coeffs, active=True)
    state.begin_pass(torch.tensor([2, 2]), torch.tensor([0, 1, 2]), num_reqs=2)
    residual = torch.ones(2, D)
    state.layer(1, torch.zeros(2, D), residual)
    assert torch.equal(residual[0], torch.ones(D))


def test_cache_salt_separates_steering_configurations_only():
    from steerer import Constraint, ProbeBank, Request, SteeringPolicy

    bank = ProbeBank.load()
    muted = bank.muted().tolist()
    c = (Constraint("lowercase", {}),)
    plain = cache_salt(Request("x", constraints=c), bank, muted, "generated")
    zero = cache_salt(Request("x", constraints=c, policy=SteeringPolicy("constant", 0.0)), bank, muted, "generated")
    s8 = cache_salt(Request("x", constraints=c, policy=SteeringPolicy("constant", 8.0)), bank, muted, "generated")
    s8b = cache_salt(Request("y", constraints=c, policy=SteeringPolicy("constant", 8.0)), bank, muted, "generated")
    s9 = cache_salt(Request("x", constraints=c, policy=SteeringPolicy("constant", 9.0)), bank, muted, "generated")
    both = cache_salt(Request("x", constraints=c, policy=SteeringPolicy("constant", 8.0)), bank, muted, "both")
    assert plain is None and zero is None
    assert s8 == s8b and len({s8, s9, both}) == 3


@pytest.mark.skipif(find_spec("vllm") is not None, reason="vLLM is installed here: the vLLM venv tests the real path")
@pytest.mark.parametrize("command", [["generate", "--prompt", "Hi", "--engine", "vllm"],
                                     ["serve", "--engine", "vllm", "--port", "0", "--metrics-port", "-1"]])
def test_engine_vllm_without_vllm_is_one_clear_line(command):
    proc = subprocess.run([sys.executable, "-m", "steerer.cli", *command], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--engine vllm needs vLLM" in lines[0] and "scripts/setup-vllm" in lines[0], proc.stderr


def test_a_pass_samples_only_when_it_reaches_the_rows_last_known_token():
    from steerer.engine.vllm.state import PassInfo

    # prompt of 10 tokens (positions 0-9); the request already has 4 generated tokens (positions 10-13)
    info = PassInfo(number=1, slots=[0, 1], last_positions=[9, 13], prompt_lengths=[10, 10])
    assert info.complete(0)  # a fresh prefill that reaches the last prompt token samples the first token
    assert info.complete(1, outputs=4)  # a decode step (or the last recompute chunk) reaches the last token
    assert not info.complete(0, outputs=4)  # a recompute chunk that stops among the generated tokens samples none
    assert not PassInfo(2, [0], [5], [10]).complete(0)  # a prefill chunk inside the prompt


def test_v1_runner_pin_check_is_one_clear_line_where_v1_is_unavailable():
    from steerer.engine.vllm.runner import FLAG, v1_runner_problem

    flags = {FLAG, "VLLM_CPU_KVCACHE_SPACE"}
    assert v1_runner_problem("0", flags, True) is None
    assert v1_runner_problem(None, flags, True) is None  # the driver sets 0 before vLLM reads it
    forced = v1_runner_problem("1", flags, True)
    assert f"set {FLAG}=0" in forced and "\n" not in forced
    assert "no longer has" in v1_runner_problem("0", flags, False)  # a vLLM without the V1 runner
    assert "does not read" in v1_runner_problem("0", {"VLLM_CPU_KVCACHE_SPACE"}, True)  # the switch is gone


def test_buffers_are_sized_once_at_install_and_filled_in_place():
    state, steer = _state()
    state.install(4, (1, 2), {1: steer}, max_tokens=16, max_rows=3, device="cpu")
    b = state.buffers
    assert b.token_slot.shape == (3, 16) and b.last.shape == (3,) and b.tables[1].shape == (5, D)
    pointers = [b.token_slot.data_ptr(), b.last.data_ptr(), b.tables[1].data_ptr()]
    steer.set_coeffs(torch.ones(4, 2), active=True)
    state.update_rows(2, [], [(0, 0, 2), (1, 1, 3)], [])
    for positions, qsl in ((torch.tensor([2, 3, 0, 0]), [0, 1, 2]), (torch.arange(9), [0, 5, 9])):
        state.begin_pass(positions, torch.tensor(qsl), num_reqs=2)
        state.layer(1, torch.zeros(len(positions), D), torch.zeros(len(positions), D))
        state.layer(2, torch.zeros(len(positions), D), torch.zeros(len(positions), D))
        assert state.buffers is b and [b.token_slot.data_ptr(), b.last.data_ptr(), b.tables[1].data_ptr()] == pointers
        assert state.captured[2].data_ptr() == b.taps[1].data_ptr()  # views on the static tap buffer
    state.begin_pass(torch.arange(20), torch.tensor([0, 10, 20]), num_reqs=2)  # a pass past the sizes: eager only
    assert state.buffers is not b and state.buffers.max_tokens == 20
