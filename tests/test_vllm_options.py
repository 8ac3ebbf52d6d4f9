"""`VLLMOptions`: `VLLMSteerer`'s and `CoreSteerer`'s one set of options (defaults and checks in one place), what
a later driver on the same engine keeps, and the plain form the engine core's driver is built from (no vLLM needed)."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest

from steerer.driver import Options
from steerer.engine.vllm.driver import VLLMOptions
from steerer.monitor import MonitorConfig
from steerer.taps import Where


def test_keywords_over_options_and_the_defaults_normalised_once():
    base = VLLMOptions(capacity=8, threads=1, where="both", layers=iter([5, 2]))
    assert (base.where, base.layers, base.monitor_config) == (Where.BOTH, (5, 2), MonitorConfig())
    assert VLLMOptions.of() == VLLMOptions()
    assert VLLMOptions().capacity == 64 and Options().capacity == 128  # vLLM's own default over the controller's
    mixed = VLLMOptions.of(base, "some/model", threads=2)  # how the constructors read (bank, model, options=, **kw)
    assert (mixed.model, mixed.threads, mixed.capacity, mixed.layers) == ("some/model", 2, 8, (5, 2))
    assert VLLMOptions.of(base, None).model is None  # model=None leaves the options' model
    assert isinstance(base, Options)  # `Driver.build` takes it as it is


@pytest.mark.parametrize(("given", "message"), [
    ({"engine_core": "thread"}, "engine_core must be 'inproc' or 'process', got 'thread'"),
    ({"layers": "bank"}, "layers must be 'all' or decoder layer numbers, got 'bank'"),
    ({"where": "nowhere"}, "'nowhere' is not a valid Where"),
])
def test_a_bad_option_is_one_line(given, message):
    with pytest.raises(ValueError, match=message):
        VLLMOptions.of(**given)


def test_an_unknown_keyword_is_refused():
    with pytest.raises(TypeError, match="unexpected keyword argument 'capacty'"):
        VLLMOptions.of(capacty=4)


def test_a_later_driver_keeps_the_controllers_options_and_threads():
    first = VLLMOptions(capacity=4, record=True, check=False, use_unreliable_probes=True, threads=1, check_bank=False,
                        stop_steering_on_detection=True, monitor_config=MonitorConfig(hold_tokens=3),
                        where=Where.PROMPT, dtype="bfloat16", layers="all", engine_core="process")
    kept = first.carried()
    assert set(kept) == {f.name for f in fields(Options)} | {"threads"}
    later = VLLMOptions.of(**kept)  # `scheduler_factory`'s successor on the same engine
    assert all(getattr(later, name) == getattr(first, name) for name in kept)
    assert later.check_bank  # a swapped-in bank is checked against the engine's weights

    wire = json.loads(json.dumps(first.to_wire()))  # plain values only (msgpack's), there and back
    monitor = wire.pop("monitor_config")  # as `core_side.install` rebuilds it
    core = VLLMOptions.of(check_bank=False, monitor_config=MonitorConfig(**monitor), **wire)
    assert all(getattr(core, name) == getattr(first, name) for name in kept)
