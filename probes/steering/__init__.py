"""`steerer probes steer`: steering directions and layers chosen for steering, not reused from the probes.

A probe's weight separates compliant from violating readings; that need not be the push that makes the
model comply. Here each task gets a direction of its own, from the corpus and its cached features, and its
layer and strength are chosen by what steering does to generated text:

1. **Direction** (training split only): per corpus row, the mean residual of its generated tokens (the first
   `max_tokens` readings, at each candidate token layer); within each group of rows that answer the same
   base request (and, for tasks whose probe is conditioned on a variant, the same variant: the bound of a
   count limit, the target polarity or register), the compliant rows' mean minus the violating rows' mean;
   averaged over the groups that hold both classes. Variants that need opposite pushes (at most / at least)
   are combined into one direction with a sign per variant (`SIGNS`): direction = mean over variants of
   sign x difference, weighted by the variant's groups, and the runtime multiplies a request's alpha by its variant's sign
   (`conditioning["steer_signs"]`).
2. **Sweep** (training-split prompts: `probes.heldout` with `split="train"`, never the test prompts
   the benchmark measures on): constant steering at every (candidate layer, fraction) with alpha = fraction
   x the layer's mean residual norm over generated tokens, greedy decoding, against the same prompts
   unsteered. Per cell: compliance by the task's checker, and the perplexity ratio as the benchmark
   measures it (the unsteered model's mean NLL per response token of the steered response vs the unsteered
   response, geometric mean over prompts).
3. **Choice** (`choose`): the cell with the largest compliance gain at perplexity ratio <= 1.10 and
   repetition (rep-3) within 0.05 of the unsteered run (`REP_MARGIN`: loops are likely text, so the ratio
   alone lets them through; distinct-2 is recorded beside it) (ties: lower ratio); a task where no cell
   gains keeps its source bank's steering, and says so.

4. **Gate** (`calibrate_gates`, where the runtime has `Probe.gate_threshold`): for tasks whose choice gained,
   conditional steering at the chosen alpha on the same prompts through the `Steerer` (the gate is the
   monitor's), at a few gate thresholds; the one gaining most at perplexity ratio <= 1.10 and rep-3 within
   0.05 of the unsteered run (`choose_gate`).

The bank written is the source bank with each chosen task's steering layer and direction replaced (and its
gate threshold), and `extra["steering"]` recording the choice per task (layer, alpha, fraction, gain,
perplexity ratio, n, signs, gate threshold). The sweep's table is `report/sweep.json` (+ `sweep.png`).

Files by job: `directions` (1, pure), `arms` (generating and scoring steered arms), `sweep` (2, per task and
resumable), `choice` (3, and the bank written, pure), `gate` (4), `plot` (the sweep document and its figure).
Intervals come from `steerer.stats`.
"""

from probes.steering.arms import Arm, LastPromptAndGenerated, distinct, generate_arms, repetition, score_cells
from probes.steering.choice import (
    PPL_LIMIT,
    REP_MARGIN,
    RULE,
    SOURCE,
    benchmark_doc,
    choice_record,
    choose,
    choose_gate,
    gain_of,
    gate_supported,
    loop_free,
    loop_only,
    steer_signs_supported,
    steered_bank,
    unsteered_repetition,
    with_gate_thresholds,
    without_looping_steering,
)
from probes.steering.directions import (
    MAX_TOKENS,
    SIGNS,
    DirectionFit,
    fit_directions,
    group_difference,
    mean_norm,
    row_means,
    steering_direction,
    variant_rule,
)
from probes.steering.gate import calibrate_gates
from probes.steering.plot import plot, save_doc
from probes.steering.sweep import DEFAULT_FRACTIONS, DEFAULT_LAYERS, SweepConfig, budget_for, run, sweep_task

__all__ = ["DEFAULT_FRACTIONS", "DEFAULT_LAYERS", "MAX_TOKENS", "PPL_LIMIT", "REP_MARGIN", "RULE", "SIGNS", "SOURCE",
           "Arm", "DirectionFit", "benchmark_doc", "distinct", "loop_free", "loop_only", "unsteered_repetition", "without_looping_steering",
           "LastPromptAndGenerated", "SweepConfig", "budget_for", "calibrate_gates", "choice_record", "choose",
           "choose_gate", "fit_directions", "gain_of", "gate_supported", "generate_arms", "group_difference",
           "mean_norm", "plot", "repetition", "row_means", "run", "save_doc", "score_cells", "steer_signs_supported",
           "steered_bank", "steering_direction", "sweep_task", "variant_rule", "with_gate_thresholds"]
