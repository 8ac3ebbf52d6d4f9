"""Parameter conditioning of bank probes: how a request's parameters select and shift a probe.

A probe for "at most 50 words" and one for "at least 50 words" read the same residual in opposite ways, and a
probe for "positive" sentiment must not be the one for "negative". A bank probe may therefore declare
`conditioning` (data in its manifest, computed by the runtime on every backend from the request's params):

- ``variant``: the name of a rule (``VARIANTS``) mapping params to a key; each key has its own weight row
  (``rows``: key -> row of the bank's ``variant_weights``); an unseen key uses the probe's own row;
- ``inputs``: scalar inputs computed from params (``{"param": "limit", "transform": "log"}``); their
  coefficients per row are in ``input_weights``, so the logit gains a per-request constant:
  w_r . x + b_r + sum_f c_rf * input_f(params);
- ``lens``: the name of a param holding words (terms, a topic): two per-token inputs, the logit lens of those
  words at the probe's layer (`steerer.lens`), with coefficients per row in ``lens_weights``;
- ``progress``: true for a probe that reads how far the text has come towards a count limit (the task's
  `progress` tracker: count so far / limit, fed by the runtime at every token), as ``PROGRESS_FEATURES``
  per-token inputs with coefficients per row in ``progress_weights``: what detection knows, for forecasts;
- ``lens_max``: "pooled" or "ids": the lens inputs are each row's running maximum over its readings so far (how
  close the model came to saying a required word), of the pooled pair or of each id before pooling (`lens_max`);
- ``pool``: "mean": the residual term reads each row's running mean of its residuals at the probe's layer over the
  generated tokens so far (the text's gist, not its last token; `pool`): w . mean(x) = mean(w . x), so the monitor
  keeps one sum and one count per row and probe; the prompt's last reading (before any generated token) reads as is;
- ``steer_signs``: variant key -> +1 or -1, the sign of the request's steering strength for that variant
  (an "at most" limit is pushed towards shorter text, an "at least" one towards longer, along one direction).

Everything here is a pure function of params, evaluated once when a request joins; per token the monitor
only gathers each row's weight row and adds its constant.
"""

from __future__ import annotations

import math
from collections.abc import Callable

VARIANTS: dict[str, Callable[[dict], str]] = {
    "bound": lambda params: "lower" if params.get("relation") == "at least" else "upper",
    "polarity": lambda params: str(params.get("polarity")),
    "register": lambda params: str(params.get("register")),
}
TRANSFORMS: dict[str, Callable[[float], float]] = {
    "log": lambda v: math.log(max(v, 1.0)),
    "identity": lambda v: v,
}
MAX_INPUTS = 4
PROGRESS_FEATURES = ("fraction", "fraction_squared", "log_tokens")  # per token: f, f^2, log(2 + token index)
KEYS = {"variant", "rows", "inputs", "lens", "progress", "steer_signs", "forecast", "lens_max", "pool"}
LENS_MAX = ("pooled", "ids")  # a running maximum of the lens inputs: of the pooled pair, or of each id before pooling
POOLS = ("mean",)  # the residual term over the generated tokens so far: their running mean


class ConditioningError(ValueError):
    """A probe's conditioning declaration names an unknown rule or is malformed."""


def check(conditioning: dict | None, n_variant_rows: int) -> None:
    """ConditioningError unless the declaration is well formed for a bank with that many variant rows."""
    if conditioning is None:
        return
    if not isinstance(conditioning, dict) or set(conditioning) - KEYS:
        raise ConditioningError(f"conditioning must be an object with {'/'.join(sorted(KEYS))}, "
                                f"got {conditioning!r:.80}")
    if not isinstance(conditioning.get("forecast", False), bool):
        raise ConditioningError(f"conditioning forecast must be true or false, got {conditioning['forecast']!r:.40}")
    if conditioning.get("forecast") and "lens" not in conditioning:
        raise ConditioningError("conditioning forecast averages the lens inputs: it needs lens")
    if conditioning.get("lens_max") is not None and (conditioning["lens_max"] not in LENS_MAX or "lens" not in conditioning
                                                     or conditioning.get("forecast")):
        raise ConditioningError(f"conditioning lens_max must be one of {'/'.join(LENS_MAX)}, with lens and without "
                                f"forecast, got {conditioning['lens_max']!r:.40}")
    if conditioning.get("pool") is not None and conditioning["pool"] not in POOLS:
        raise ConditioningError(f"conditioning pool must be one of {'/'.join(POOLS)}, got {conditioning['pool']!r:.40}")
    if not isinstance(conditioning.get("progress", False), bool):
        raise ConditioningError(f"conditioning progress must be true or false, got {conditioning['progress']!r:.40}")
    signs = conditioning.get("steer_signs", {})
    if not (isinstance(signs, dict) and all(isinstance(k, str) and v in (-1, 1) and not isinstance(v, bool)
                                            for k, v in signs.items())):
        raise ConditioningError(f"conditioning steer_signs must map variant keys to -1 or 1, got {signs!r:.80}")
    if "lens" in conditioning and not (isinstance(conditioning["lens"], str) and conditioning["lens"]):
        raise ConditioningError(f"conditioning lens must name a param, got {conditioning['lens']!r:.80}")
    variant = conditioning.get("variant")
    if variant is not None:
        if variant not in VARIANTS:
            raise ConditioningError(f"unknown conditioning variant {variant!r}; known: {', '.join(VARIANTS)}")
        rows = conditioning.get("rows")
        if not isinstance(rows, dict) or not rows or not all(
                isinstance(r, int) and not isinstance(r, bool) and 0 <= r < n_variant_rows for r in rows.values()):
            raise ConditioningError(f"conditioning rows must map keys to variant rows in [0, {n_variant_rows}), "
                                    f"got {rows!r:.80}")
    inputs = conditioning.get("inputs", [])
    if not isinstance(inputs, list) or len(inputs) > MAX_INPUTS:
        raise ConditioningError(f"conditioning inputs must be a list of at most {MAX_INPUTS}")
    for spec in inputs:
        if not (isinstance(spec, dict) and isinstance(spec.get("param"), str)
                and spec.get("transform", "identity") in TRANSFORMS):
            raise ConditioningError(f"conditioning input must be {{param, transform in {sorted(TRANSFORMS)}}}, "
                                    f"got {spec!r:.80}")


def variant_row(conditioning: dict | None, params: dict) -> int | None:
    """The variant row for these params, or None for the probe's own row."""
    if not conditioning or conditioning.get("variant") is None:
        return None
    return conditioning["rows"].get(VARIANTS[conditioning["variant"]](params))


def steer_sign(conditioning: dict | None, params: dict) -> float:
    """The sign the request's variant gives its steering strength (1 where none is declared)."""
    signs = (conditioning or {}).get("steer_signs")
    if not signs or conditioning.get("variant") is None:
        return 1.0
    return float(signs.get(VARIANTS[conditioning["variant"]](params), 1))


def reads_progress(conditioning: dict | None) -> bool:
    return bool((conditioning or {}).get("progress", False))


def forecasts(conditioning: dict | None) -> bool:
    """A forecast (term_exclusion's warning): its lens inputs are each row's running mean over its readings so
    far, from the prompt's last token on (how readily the model reaches for the word), and it may flag from that
    first reading (no warm-up)."""
    return bool((conditioning or {}).get("forecast", False))


def lens_max(conditioning: dict | None) -> str | None:
    """How a probe keeps the running maximum of its lens inputs over its readings so far (from the prompt's last
    token on: how close the model came to saying a required word): "pooled" (max of each reading's max/mean
    pair), "ids" (each id's maximum, then max/mean over the ids), or None (the reading of this pass)."""
    return (conditioning or {}).get("lens_max")


def pool(conditioning: dict | None) -> str | None:
    """How a probe's residual term reads the response so far: "mean" (the running mean of its residuals over the
    generated tokens; the prompt's last reading as is) or None (the reading of this pass)."""
    return (conditioning or {}).get("pool")


def progress_features(fraction, index):
    """[B, 3] per-token progress inputs (`PROGRESS_FEATURES`) from the count fraction [B] and the reading's
    token index [B] (-1 for the last prompt token): tensors or numpy arrays alike."""
    import numpy as np

    if isinstance(fraction, np.ndarray):
        return np.stack([fraction, fraction * fraction, np.log1p(np.maximum(index + 1.0, 0.0))], axis=-1)
    import torch

    steps = (index.to(fraction.dtype) + 1.0).clamp(min=0.0)
    return torch.stack([fraction, fraction * fraction, torch.log1p(steps)], dim=-1)


def lens_param(conditioning: dict | None) -> str | None:
    """The param whose words the probe's lens inputs read, or None."""
    return (conditioning or {}).get("lens")


def input_values(conditioning: dict | None, params: dict) -> list[float]:
    """The declared scalar inputs for these params (a missing or non-numeric param counts as 0)."""
    out = []
    for spec in (conditioning or {}).get("inputs", []):
        value = params.get(spec["param"])
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        out.append(TRANSFORMS[spec.get("transform", "identity")](float(value)) if ok else 0.0)
    return out
