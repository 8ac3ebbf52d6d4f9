"""The probe bank: one linear probe per task at its own layer, stored as data (safetensors + JSON).

Probes are kept in raw residual space: the training scaler is folded into the weights, so scoring a
token is one batched matmul over the tapped residuals, `sigmoid(x @ w + b)` = P(constraint satisfied), with
the weight row and constant a request's params select (`request_rows`; the monitor scores).
Each probe also carries a unit steering direction, signed toward satisfaction, and its measured
reliability (`steerer.reliability`: held-out AUROC with a 95% bootstrap interval on every held-out column,
in-distribution requests, held-out phrasing, IFEval): a probe whose interval reaches chance on any column
is marked `reliable: false` with the column named, and the serving side mutes it unless told otherwise;
one reliable only within its measured parameter range is muted per request outside it (`reliable_for`).

Every bank is validated when built or loaded (structure, types, shapes, dtype, finite values, unit
directions): a bad bank is a `BankError` naming the problem, never a crash later in a forward pass.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from steerer import conditioning, lens, reliability

FORMAT_VERSION = 2  # 2 added parameter conditioning (optional tensors); format 1 banks still load
READABLE_FORMATS = (1, 2)
MANIFEST = "manifest.json"
TENSORS = "probes.safetensors"
DEFAULT_BANK = Path(__file__).resolve().parent / "banks" / "smollm2-135m-instruct"  # the runtime's shipped data
DIRECTION_TOLERANCE = 1e-3  # |norm - 1| allowed for a stored unit direction (float rounding, bf16 saves)
TENSOR_NAMES = ("weights", "biases", "directions", "variant_weights", "variant_biases", "input_weights",
                "lens_weights", "progress_weights")
WARNING = "warning"  # sub-folder of a bank holding its token-level warning predictors (same format)
PROBE_FIELDS = {"task": str, "layer": int, "position": str, "polarity": str, "threshold": float, "method": str,
                "flag_threshold": float | None, "metrics": dict, "reliable": bool | None,
                "conditioning": dict | None, "steer_layer": int | None, "gate_threshold": float | None,
                "reliability": dict | None}


class BankError(ValueError):
    """A bank is missing, malformed, or made for another model."""


@dataclass(frozen=True)
class Probe:
    task: str
    layer: int
    position: str = "eos"  # where it was trained: last_prompt | first | body | eos | all_generated
    polarity: str = "satisfied"  # the sigmoid output is P(constraint satisfied)
    threshold: float = 0.5  # predict a violation at EOS when P(satisfied) < threshold (calibrated on validation)
    method: str = "logreg"
    flag_threshold: float | None = None  # for flags during generation (None: `threshold`); see Monitor
    metrics: dict = field(default_factory=dict)  # test_auroc, test_auroc_ci [low, high], n_test, accuracy, ...
    # Held-out AUROC's 95% interval clears chance (None: not measured, e.g. a bank from before this field).
    # Only a probe with reliable=True flags and steers by default.
    reliable: bool | None = None
    # How the request's params select and shift this probe (`steerer.conditioning`); None = not conditioned.
    conditioning: dict | None = None
    # Where steering along this probe's direction is added (None: at `layer`). Reading and steering need not
    # share a layer: a probe may read best where steering does little (e.g. the last layer).
    steer_layer: int | None = None
    # Conditional steering acts while P(satisfied) is below this (None: the flag threshold). Calibrated for
    # steering (gain against fluency), apart from the alert threshold (false flags against early warning).
    gate_threshold: float | None = None
    # `steerer.reliability.assess` of `metrics`: reliable or not, which held-out column failed, each column's
    # interval, and the parameter range the probe holds within (None: a bank from before this field).
    reliability: dict | None = None

    @property
    def steering_layer(self) -> int:
        return self.layer if self.steer_layer is None else self.steer_layer

    @property
    def auroc_ci(self) -> tuple[float, float] | None:
        ci = self.metrics.get("test_auroc_ci")
        return (float(ci[0]), float(ci[1])) if ci is not None else None

    @property
    def failed_columns(self) -> list[str]:
        """Held-out columns whose AUROC interval reaches chance (empty when reliable or not recorded)."""
        return list((self.reliability or {}).get("failed", []))

    @property
    def reliable_range(self) -> dict | None:
        """param -> [low, high] this unreliable probe still holds within (None: no such scope)."""
        return None if self.reliable else reliability.scoped(self.reliability)

    def unreliable_reason(self) -> str | None:
        """Why this probe should not be trusted, or None if it is marked reliable."""
        if self.reliable:
            return None
        if self.reliability is not None:
            return reliability.describe(self.reliability)
        if self.reliable is None:
            return "no measured reliability"
        ci = self.auroc_ci
        return f"95% AUROC interval [{ci[0]:.2f}, {ci[1]:.2f}] reaches chance" if ci else "marked unreliable"

    def reliable_for(self, params: dict | None = None) -> tuple[bool, str]:
        """(trusted for a request with these params, why not): reliable, or reliable within its measured range
        and the params inside it."""
        if self.reliable:
            return True, ""
        limits = self.reliable_range
        if limits is None:
            return False, self.unreliable_reason() or "unreliable"
        inside, why = reliability.in_range(params, limits)
        return (True, "") if inside else (False, f"{why} (failed on {', '.join(self.failed_columns)})")


@dataclass
class ProbeBank:
    model: str
    fingerprint: str
    hidden_size: int
    probes: list[Probe]
    weights: torch.Tensor  # [K, d] raw residual space
    biases: torch.Tensor  # [K]
    directions: torch.Tensor  # [K, d] unit, toward satisfaction, in the residual space of each steering layer
    version: str = "0"
    extra: dict = field(default_factory=dict)
    # Parameter conditioning (empty when no probe declares any): weight rows selected by a request's params,
    # and coefficients of scalar inputs computed from them, for the K probe rows then the V variant rows.
    variant_weights: torch.Tensor | None = None  # [V, d]
    variant_biases: torch.Tensor | None = None  # [V]
    input_weights: torch.Tensor | None = None  # [K + V, F]
    lens_weights: torch.Tensor | None = None  # [K + V, 2] (or [K + V, 0] when no probe declares a lens)
    progress_weights: torch.Tensor | None = None  # [K + V, 3] (or [K + V, 0]): coefficients of progress inputs
    # Token-level predictors for flags and the steering gate (same tasks, same order); None: the probes above
    # (trained at the end of the response) also flag. Saved in the bank's `warning/` sub-folder.
    warning: ProbeBank | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.hidden_size, int) or isinstance(self.hidden_size, bool) or self.hidden_size < 1:
            raise BankError(f"bank hidden_size must be a positive integer, got {self.hidden_size!r}")
        if not self.probes:
            raise BankError("bank has no probes")
        for i, probe in enumerate(self.probes):
            check_probe(probe, f"probes[{i}]")
        tasks = self.tasks
        repeated = sorted({t for t in tasks if tasks.count(t) > 1})
        if repeated:
            raise BankError(f"bank has several probes for one task: {', '.join(repeated)}")
        k, d = len(self.probes), self.hidden_size
        if self.variant_weights is None:
            self.variant_weights = torch.zeros(0, d)
        if self.variant_biases is None:
            self.variant_biases = torch.zeros(len(self.variant_weights) if self.variant_weights.dim() else 0)
        v = int(self.variant_weights.shape[0]) if self.variant_weights.dim() == 2 else -1
        # Zero-width tables carry no data: re-derived, so replacing the variant rows needs no new empty tables.
        if self.input_weights is None or (isinstance(self.input_weights, torch.Tensor)
                                          and self.input_weights.dim() == 2 and self.input_weights.shape[1] == 0):
            self.input_weights = torch.zeros(k + max(v, 0), 0)
        f = int(self.input_weights.shape[1]) if self.input_weights.dim() == 2 else -1
        lens_width = lens.FEATURES if any(conditioning.lens_param(p.conditioning) for p in self.probes) else 0
        if self.lens_weights is None or (isinstance(self.lens_weights, torch.Tensor) and self.lens_weights.dim() == 2
                                         and self.lens_weights.shape[1] == 0 and lens_width == 0):
            self.lens_weights = torch.zeros(k + max(v, 0), lens_width)
        progress_width = len(conditioning.PROGRESS_FEATURES) if any(
            conditioning.reads_progress(p.conditioning) for p in self.probes) else 0
        if self.progress_weights is None or (isinstance(self.progress_weights, torch.Tensor)
                                             and self.progress_weights.dim() == 2
                                             and self.progress_weights.shape[1] == 0 and progress_width == 0):
            self.progress_weights = torch.zeros(k + max(v, 0), progress_width)
        for i, probe in enumerate(self.probes):
            try:
                conditioning.check(probe.conditioning, max(v, 0))
            except conditioning.ConditioningError as exc:
                raise BankError(f"probes[{i}] ({probe.task}): {exc}") from None
            if len(conditioning.input_values(probe.conditioning, {})) > f:
                raise BankError(f"probes[{i}] ({probe.task}) declares more conditioning inputs than input_weights has "
                                f"columns ({f})")
        for name, shape in (("weights", (k, d)), ("biases", (k,)), ("directions", (k, d)),
                            ("variant_weights", (v, d)), ("variant_biases", (v,)), ("input_weights", (k + v, f)),
                            ("lens_weights", (k + v, lens_width)), ("progress_weights", (k + v, progress_width))):
            tensor = getattr(self, name)
            if not isinstance(tensor, torch.Tensor):
                raise BankError(f"bank {name} is a {type(tensor).__name__}, expected a tensor")
            if not tensor.is_floating_point():
                raise BankError(f"bank {name} has dtype {tensor.dtype}, expected a floating-point dtype")
            if tuple(tensor.shape) != shape:
                raise BankError(f"bank {name} has shape {tuple(tensor.shape)}, expected {shape}")
            tensor = tensor.float().contiguous()
            flat = tensor.reshape(len(tensor), -1) if tensor.numel() else tensor.reshape(len(tensor), 0)
            bad = ~torch.isfinite(flat).all(dim=1)  # checked after the cast: fp64 can overflow
            if bool(bad.any()):
                rows = bad.nonzero().flatten().tolist()
                names = ", ".join(tasks[i] if name in ("weights", "biases", "directions") else f"row {i}" for i in rows)
                raise BankError(f"bank {name} has non-finite values (NaN or inf) for probe(s) {names}")
            setattr(self, name, tensor)
        norms = self.directions.norm(dim=1)
        off = ((norms - 1).abs() > DIRECTION_TOLERANCE).nonzero().flatten().tolist()
        if off:
            raise BankError("bank directions must be unit vectors; " + ", ".join(
                f"{tasks[i]} has norm {float(norms[i]):.4g}" for i in off))
        if self.warning is not None:
            if not isinstance(self.warning, ProbeBank):
                raise BankError(f"bank warning must be a ProbeBank, got {type(self.warning).__name__}")
            if self.warning.tasks != tasks:
                raise BankError(f"bank warning predictors are for {', '.join(self.warning.tasks)}; the bank's probes "
                                f"are for {', '.join(tasks)} (same tasks, same order)")
            if (self.warning.fingerprint, self.warning.hidden_size) != (self.fingerprint, self.hidden_size):
                raise BankError("bank warning predictors were trained on another model")
            if self.warning.warning is not None:
                raise BankError("bank warning predictors cannot have warning predictors of their own")

    @property
    def device(self) -> torch.device:
        return self.weights.device

    def to(self, device: str | torch.device) -> ProbeBank:
        """The same bank with its tensors on `device` (itself when they are there already)."""
        device = torch.device(device)
        if self.weights.device == device:
            return self
        return replace(self, **{name: getattr(self, name).to(device) for name in TENSOR_NAMES},
                       warning=self.warning.to(device) if self.warning is not None else None)

    @property
    def tasks(self) -> list[str]:
        return [p.task for p in self.probes]

    @property
    def layers(self) -> tuple[int, ...]:
        """Every layer the runtime touches: where probes (and warning predictors) read and where steering is added."""
        warning = {p.layer for p in self.warning.probes} if self.warning is not None else set()
        return tuple(sorted({p.layer for p in self.probes} | {p.steering_layer for p in self.probes} | warning))

    @property
    def alerting(self) -> ProbeBank:
        """What flags and gates conditional steering: the warning predictors, else the probes themselves."""
        return self.warning if self.warning is not None else self

    @property
    def steering_layers(self) -> tuple[int, ...]:
        return tuple(sorted({p.steering_layer for p in self.probes}))

    def index(self, task: str) -> int:
        for i, probe in enumerate(self.probes):
            if probe.task == task:
                return i
        raise KeyError(f"no probe for task {task!r} in the bank; it has {', '.join(self.tasks)}")

    @property
    def row_weights(self) -> torch.Tensor:
        """[K + V, d]: the probes' own rows, then the variant rows (what a request's `request_rows` index)."""
        return torch.cat([self.weights, self.variant_weights])

    def request_rows(self, params_by_task: dict[str, dict] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """For one request: per probe the weight row its params select ([K] long into `row_weights`) and the
        logit's constant (bias + conditioning inputs, [K]). Tasks without params use the probe's own row."""
        params_by_task = params_by_task or {}
        k = len(self.probes)
        index, offset = list(range(k)), self.biases.tolist()
        biases = torch.cat([self.biases, self.variant_biases]).tolist()
        for i, probe in enumerate(self.probes):
            params = params_by_task.get(probe.task)
            if params is None or probe.conditioning is None:
                continue
            row = conditioning.variant_row(probe.conditioning, params)
            index[i] = i if row is None else k + row
            values = conditioning.input_values(probe.conditioning, params)
            coefs = self.input_weights[index[i]].tolist()
            offset[i] = biases[index[i]] + sum(c * x for c, x in zip(coefs, values, strict=False))
        return (torch.tensor(index, dtype=torch.long, device=self.device),
                torch.tensor(offset, dtype=torch.float32, device=self.device))

    @property
    def lens_params(self) -> list[str | None]:
        """Per probe, the param whose words its lens inputs read (None: no lens)."""
        return [conditioning.lens_param(p.conditioning) for p in self.probes]

    @property
    def unreliable(self) -> list[str]:
        """Tasks whose probe is not marked reliable (measured at chance, or not measured)."""
        return [p.task for p in self.probes if not p.reliable]

    def muted(self, use_unreliable: bool = False) -> torch.Tensor:
        """[K] bool: probes that must not flag or steer for any request (the unreliable ones with no range they
        hold within, unless `use_unreliable`); a scoped probe is muted per request (`out_of_range`)."""
        return torch.tensor([not (use_unreliable or bool(p.reliable) or p.reliable_range is not None)
                             for p in self.probes], dtype=torch.bool)

    def unsteerable(self, task: str) -> str | None:
        """Why the bank's steering sweep advises against steering `task` (`extra["steering"][task]`:
        `steerable: false`, e.g. every gaining strength looped), or None. Advice: a request that asks still
        steers (callers warn)."""
        record = (self.extra.get("steering") or {}).get(task)
        if isinstance(record, dict) and record.get("steerable") is False:
            return str(record.get("steerable_reason") or "marked not steerable by its sweep")
        return None

    def reliable_for(self, task: str, params: dict | None = None) -> tuple[bool, str]:
        """(may `task`'s probe flag and steer for a request with `params`, why not). The per-request hook of
        scoped reliability; a task not in the bank is a KeyError."""
        return self.probes[self.index(task)].reliable_for(params)

    def out_of_range(self, params_by_task: dict[str, dict], use_unreliable: bool = False) -> dict[str, str]:
        """task -> reason, for the request's tasks whose probe is served in general (`muted` is False) but must
        be muted for these params: a scoped probe asked outside the range it was measured reliable on."""
        if use_unreliable:
            return {}
        out = {}
        for task, params in params_by_task.items():
            probe = self.probes[self.index(task)]
            if not probe.reliable and probe.reliable_range is not None:
                ok, why = probe.reliable_for(params)
                if not ok:
                    out[task] = why
        return out

    @property
    def thresholds(self) -> torch.Tensor:
        return torch.tensor([p.threshold for p in self.probes], dtype=torch.float32)

    @property
    def flag_thresholds(self) -> torch.Tensor:
        return torch.tensor([p.threshold if p.flag_threshold is None else p.flag_threshold for p in self.probes],
                            dtype=torch.float32)

    @property
    def gate_thresholds(self) -> torch.Tensor:
        """Per probe, the P(satisfied) below which conditional steering acts (default: the flag threshold)."""
        flags = self.flag_thresholds.tolist()
        return torch.tensor([f if p.gate_threshold is None else p.gate_threshold
                             for p, f in zip(self.probes, flags, strict=True)], dtype=torch.float32)

    @property
    def progress_params(self) -> list[bool]:
        """Per probe: does it read the task's progress towards its limit (a per-token input)?"""
        return [conditioning.reads_progress(p.conditioning) for p in self.probes]

    def subset(self, tasks: list[str]) -> ProbeBank:
        """The bank with only these tasks' probes (their variant rows renumbered)."""
        picked = [self.index(t) for t in tasks]
        k, probes, variant_rows = len(self.probes), [], []
        for i in picked:
            probe = self.probes[i]
            cond = probe.conditioning
            if cond and cond.get("variant") is not None:
                rows = {key: len(variant_rows) + j for j, key in enumerate(cond["rows"])}
                variant_rows += list(cond["rows"].values())
                probe = replace(probe, conditioning=cond | {"rows": rows})
            probes.append(probe)
        return replace(self, probes=probes, weights=self.weights[picked], biases=self.biases[picked],
                       directions=self.directions[picked], variant_weights=self.variant_weights[variant_rows],
                       variant_biases=self.variant_biases[variant_rows],
                       input_weights=self.input_weights[picked + [k + r for r in variant_rows]],
                       lens_weights=self.lens_weights[picked + [k + r for r in variant_rows]]
                       if any(conditioning.lens_param(p.conditioning) for p in probes) else None,
                       progress_weights=self.progress_weights[picked + [k + r for r in variant_rows]]
                       if any(conditioning.reads_progress(p.conditioning) for p in probes) else None,
                       warning=self.warning.subset(tasks) if self.warning is not None else None)

    def check_model(self, fingerprint: str, hidden_size: int) -> None:
        if hidden_size != self.hidden_size:
            raise BankError(f"bank is for hidden size {self.hidden_size} ({self.model}); the model has {hidden_size}")
        if fingerprint != self.fingerprint:
            raise BankError(f"bank was trained on model {self.model} (fingerprint {self.fingerprint}); "
                            f"the loaded model's fingerprint is {fingerprint}")

    def save(self, folder: str | Path) -> Path:
        """Write atomically: a temp folder beside the target, renamed into place."""
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            save_file({name: getattr(self, name).contiguous() for name in TENSOR_NAMES},
                      str(tmp / TENSORS), metadata={"format_version": str(FORMAT_VERSION)})
            manifest = {"format_version": FORMAT_VERSION, "model": self.model, "fingerprint": self.fingerprint,
                        "hidden_size": self.hidden_size, "version": self.version,
                        "probes": [asdict(p) for p in self.probes], **self.extra}
            manifest.update(_save_tasks(tmp, self.tasks))  # a file task's YAML travels with the bank
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            if self.warning is not None:
                self.warning.save(tmp / WARNING)
            os.chmod(tmp, 0o755)
            if folder.exists():
                shutil.rmtree(folder)
            tmp.rename(folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return folder

    @classmethod
    def load(cls, folder: str | Path | None = None) -> ProbeBank:
        """Read and validate a bank folder; every problem with its files or content is a BankError."""
        folder = Path(folder) if folder else DEFAULT_BANK
        if not (folder / MANIFEST).is_file() or not (folder / TENSORS).is_file():
            raise BankError(f"no probe bank at {folder} (needs {MANIFEST} and {TENSORS})")
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BankError(f"{folder / MANIFEST}: not valid JSON ({_one_line(exc)})") from None
        probes = _parse_manifest(manifest, folder / MANIFEST)
        _load_tasks(folder, [p.task for p in probes], manifest)
        try:
            tensors = load_file(str(folder / TENSORS))
        except Exception as exc:  # safetensors raises its own SafetensorError for truncated or corrupt files
            raise BankError(f"{folder / TENSORS}: not a readable safetensors file ({_one_line(exc)})") from None
        missing = [name for name in ("weights", "biases", "directions") if name not in tensors]
        if missing:
            raise BankError(f"{folder / TENSORS}: missing tensor(s) {', '.join(missing)}")
        known = {"format_version", "model", "fingerprint", "hidden_size", "version", "probes"}
        warning = cls.load(folder / WARNING) if (folder / WARNING / MANIFEST).is_file() else None
        try:
            return cls(manifest["model"], manifest["fingerprint"], manifest["hidden_size"], probes,
                       tensors["weights"], tensors["biases"], tensors["directions"], str(manifest.get("version", "0")),
                       {k: v for k, v in manifest.items() if k not in known}, tensors.get("variant_weights"),
                       tensors.get("variant_biases"), tensors.get("input_weights"), tensors.get("lens_weights"),
                       tensors.get("progress_weights"), warning)
        except BankError as exc:
            raise BankError(f"{folder}: {exc}") from None


def _save_tasks(folder: Path, tasks: list[str]) -> dict:
    """Write the bank's task files into ``folder/tasks/``; the manifest entry naming its non-built-in tasks'
    sources (`steerer.tasks.registry.save_bank_tasks`)."""
    from steerer.tasks.registry import save_bank_tasks

    return save_bank_tasks(folder, tasks)


def _load_tasks(folder: Path, tasks: list[str], manifest: dict) -> None:
    """Register the task files a bank carries and check its plugin tasks are installed: one BankError line."""
    from steerer.tasks.registry import SOURCES_KEY, load_bank_tasks

    try:
        load_bank_tasks(folder, tasks, manifest.get(SOURCES_KEY))
    except ValueError as exc:
        raise BankError(f"{folder}: {exc}") from None


def check_probe(probe: Probe, where: str = "probe") -> None:
    """BankError unless every field of the probe has its declared type and a sane value."""
    for name, kind in PROBE_FIELDS.items():
        value = getattr(probe, name)
        allowed = kind.__args__ if hasattr(kind, "__args__") else (kind,)
        ok = any(value is None if t is type(None) else _is(value, t) for t in allowed)
        if not ok:
            raise BankError(f"{where}.{name} must be {_type_name(kind)}, got {value!r:.80}")
    if not probe.task:
        raise BankError(f"{where}.task is empty")
    if probe.layer < 0:
        raise BankError(f"{where}.layer must be >= 0, got {probe.layer}")
    if probe.steer_layer is not None and probe.steer_layer < 0:
        raise BankError(f"{where}.steer_layer must be >= 0, got {probe.steer_layer}")
    if probe.polarity != "satisfied":
        raise BankError(f"{where}.polarity must be 'satisfied' (probes output P(constraint satisfied))")
    for name in ("threshold", "flag_threshold", "gate_threshold"):
        value = getattr(probe, name)
        if value is not None and not 0 <= value <= 1:
            raise BankError(f"{where}.{name} must be a probability in [0, 1], got {value!r}")
    for column in reliability.COLUMNS:
        for key in (f"{column}_auroc_ci", f"{column}_{reliability.IN_RANGE}_auroc_ci"):
            ci = probe.metrics.get(key)
            if ci is not None and not (isinstance(ci, list | tuple) and len(ci) == 2
                                       and all(_is(x, float) for x in ci)):
                raise BankError(f"{where}.metrics.{key} must be [low, high], got {ci!r:.80}")
        ci = probe.metrics.get(f"{column}_auroc_ci")
        if probe.reliable and ci is not None and not ci[0] > 0.5:
            name = "AUROC interval" if column == "test" else f"{column} AUROC interval"
            raise BankError(f"{where} ({probe.task}) is marked reliable but its {name} {list(ci)} reaches chance")
    problem = reliability.check(probe.reliability, probe.metrics, probe.reliable)
    if problem:
        raise BankError(f"{where} ({probe.task}): {problem}")


def _is(value, kind: type) -> bool:
    """JSON-typed check: bools are not numbers, and an integer is a valid float."""
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _type_name(kind) -> str:
    names = {str: "a string", int: "an integer", float: "a finite number", dict: "an object", bool: "true or false"}
    allowed = kind.__args__ if hasattr(kind, "__args__") else (kind,)
    return " or ".join("null" if t is type(None) else names[t] for t in allowed)


def _parse_manifest(manifest, path: Path) -> list[Probe]:
    """The manifest's probes, after checking its structure: a JSON object with typed required keys."""
    if not isinstance(manifest, dict):
        raise BankError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("format_version") not in READABLE_FORMATS:
        raise BankError(f"{path}: bank format {manifest.get('format_version')!r:.40}, this steerer reads "
                        f"{' and '.join(map(str, READABLE_FORMATS))}")
    for key, kind in (("model", str), ("fingerprint", str), ("hidden_size", int), ("probes", list)):
        if key not in manifest:
            raise BankError(f"{path}: missing key {key!r}")
        if not _is(manifest[key], kind):
            raise BankError(f"{path}: {key} must be {'a list' if kind is list else _type_name(kind)}, "
                            f"got {manifest[key]!r:.80}")
    if "version" in manifest and not (isinstance(manifest["version"], str) or _is(manifest["version"], int)):
        raise BankError(f"{path}: version must be a string, got {manifest['version']!r:.80}")
    probes = []
    for i, entry in enumerate(manifest["probes"]):
        if not isinstance(entry, dict):
            raise BankError(f"{path}: probes[{i}] must be an object, got {type(entry).__name__}")
        unknown = sorted(set(entry) - set(PROBE_FIELDS))
        if unknown:
            raise BankError(f"{path}: probes[{i}] has unknown field(s) {', '.join(unknown)}")
        missing = [name for name in ("task", "layer") if name not in entry]
        if missing:
            raise BankError(f"{path}: probes[{i}] is missing {', '.join(missing)}")
        probe = Probe(**entry)
        check_probe(probe, f"{path}: probes[{i}]")
        probes.append(probe)
    return probes


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def muted_notice(bank: ProbeBank, override: str = "--use-unreliable-probes") -> str | None:
    """One line naming the probes a server or CLI mutes by default and why, or None when none is muted."""
    groups: dict[str, list[str]] = {}
    for probe in bank.probes:
        if not probe.reliable:
            scope = "" if probe.reliable_range is None else "; muted only for requests outside that range"
            groups.setdefault(probe.unreliable_reason() + scope, []).append(probe.task)
    if not groups:
        return None
    muted = ", ".join(f"{', '.join(tasks)} ({reason})" for reason, tasks in groups.items())
    return f"steerer: muted probes, no flags or steering: {muted}; {override} to use them"


def keep_steering(bank: ProbeBank, source: ProbeBank) -> ProbeBank:
    """`bank` with each task's steering taken from `source` (same model) where it has the task: its layer,
    direction and gate threshold, and the sweep's records (`extra["steering"]`: strength, `steerable`; the
    sweep's command). New probes for reading, steering whose efficacy was measured on the source bank."""
    source.check_model(bank.fingerprint, bank.hidden_size)
    directions = bank.directions.clone()
    probes = list(bank.probes)
    kept = [t for t in bank.tasks if t in source.tasks]
    for i, probe in enumerate(bank.probes):
        if probe.task in kept:
            j = source.index(probe.task)
            directions[i] = source.directions[j]
            probes[i] = replace(probe, steer_layer=source.probes[j].steering_layer,
                                gate_threshold=source.probes[j].gate_threshold)
    records = {t: r for t, r in (source.extra.get("steering") or {}).items() if t in kept}
    extra = bank.extra | {"steering_from": {"version": source.version, "tasks": kept}}
    if records:
        extra["steering"] = (bank.extra.get("steering") or {}) | records
    if "steering_sweep" in source.extra:
        extra["steering_sweep"] = source.extra["steering_sweep"]
    return replace(bank, probes=probes, directions=directions, extra=extra)


def content_version(bank: ProbeBank) -> str:
    """A version that changes whenever the bank's content does: a hash of its tensors and probe records."""
    import hashlib

    h = hashlib.sha256()
    for name in TENSOR_NAMES:
        h.update(getattr(bank, name).detach().float().cpu().numpy().tobytes())
    h.update(json.dumps([asdict(p) for p in bank.probes], sort_keys=True).encode())
    if bank.warning is not None:
        h.update(content_version(bank.warning).encode())
    return f"{bank.fingerprint[:8]}-{h.hexdigest()[:12]}"


def fold_scaler(weight: torch.Tensor, bias: float, mean: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Turn a probe on standardised inputs, w . (x - mean)/scale + b, into one on raw residuals."""
    raw = weight / scale
    return raw, float(bias - (raw * mean).sum())
