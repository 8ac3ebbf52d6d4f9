"""A/B experiments on steering strength: experiments and arm assignment (`experiments`), the outcome log
(`outcomes`), the analysis (`analysis`, `sequential`, `fluency`) and `steerer ab ...` (`cli`). See docs/AB.md."""

from steerer.ab.experiments import (
    Arm,
    Assignment,
    Experiment,
    ExperimentError,
    ExperimentSet,
    assign,
    bucket,
    load,
)

__all__ = ["Arm", "Assignment", "Experiment", "ExperimentError", "ExperimentSet", "assign", "bucket", "load"]
