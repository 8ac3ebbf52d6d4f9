"""The probe bank: one linear probe per task at its own layer, stored as data (safetensors + JSON).

Probes are kept in raw residual space: the training scaler is folded into the weights, so scoring a
token is one batched matmul over the tapped residuals, `sigmoid(x @ w + b)` = P(constraint satisfied).
Each probe also carries a unit steering direction, signed toward satisfaction, and its measured
reliability (held-out AUROC with a 95% bootstrap interval): a probe whose interval reaches chance is
marked `reliable: false`, and the serving side mutes it unless told otherwise.

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

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "probes.safetensors"
DEFAULT_BANK = Path(__file__).resolve().parents[1] / "probes" / "banks" / "smollm2-135m-instruct"
DIRECTION_TOLERANCE = 1e-3  # |norm - 1| allowed for a stored unit direction (float rounding, bf16 saves)
PROBE_FIELDS = {"task": str, "layer": int, "position": str, "polarity": str, "threshold": float, "method": str,
                "flag_threshold": float | None, "metrics": dict, "reliable": bool | None}


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

    @property
    def auroc_ci(self) -> tuple[float, float] | None:
        ci = self.metrics.get("test_auroc_ci")
        return (float(ci[0]), float(ci[1])) if ci is not None else None

    def unreliable_reason(self) -> str | None:
        """Why this probe should not be trusted, or None if it is marked reliable."""
        if self.reliable:
            return None
        if self.reliable is None:
            return "no measured reliability"
        ci = self.auroc_ci
        return f"95% AUROC interval [{ci[0]:.2f}, {ci[1]:.2f}] reaches chance" if ci else "marked unreliable"


@dataclass
class ProbeBank:
    model: str
    fingerprint: str
    hidden_size: int
    probes: list[Probe]
    weights: torch.Tensor  # [K, d] raw residual space
    biases: torch.Tensor  # [K]
    directions: torch.Tensor  # [K, d] unit, toward satisfaction
    version: str = "0"
    extra: dict = field(default_factory=dict)

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
        for name, shape in (("weights", (k, d)), ("biases", (k,)), ("directions", (k, d))):
            tensor = getattr(self, name)
            if not isinstance(tensor, torch.Tensor):
                raise BankError(f"bank {name} is a {type(tensor).__name__}, expected a tensor")
            if not tensor.is_floating_point():
                raise BankError(f"bank {name} has dtype {tensor.dtype}, expected a floating-point dtype")
            if tuple(tensor.shape) != shape:
                raise BankError(f"bank {name} has shape {tuple(tensor.shape)}, expected {shape}")
            tensor = tensor.float().contiguous()
            bad = ~torch.isfinite(tensor.reshape(k, -1)).all(dim=1)  # checked after the cast: fp64 can overflow
            if bool(bad.any()):
                raise BankError(f"bank {name} has non-finite values (NaN or inf) for probe(s) "
                                f"{', '.join(tasks[i] for i in bad.nonzero().flatten().tolist())}")
            setattr(self, name, tensor)
        norms = self.directions.norm(dim=1)
        off = ((norms - 1).abs() > DIRECTION_TOLERANCE).nonzero().flatten().tolist()
        if off:
            raise BankError("bank directions must be unit vectors; " + ", ".join(
                f"{tasks[i]} has norm {float(norms[i]):.4g}" for i in off))

    @property
    def device(self) -> torch.device:
        return self.weights.device

    def to(self, device: str | torch.device) -> ProbeBank:
        """The same bank with its tensors on `device` (itself when they are there already)."""
        device = torch.device(device)
        if self.weights.device == device:
            return self
        return replace(self, weights=self.weights.to(device), biases=self.biases.to(device),
                       directions=self.directions.to(device))

    @property
    def tasks(self) -> list[str]:
        return [p.task for p in self.probes]

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted({p.layer for p in self.probes}))

    def index(self, task: str) -> int:
        for i, probe in enumerate(self.probes):
            if probe.task == task:
                return i
        raise KeyError(f"no probe for task {task!r} in the bank; it has {', '.join(self.tasks)}")

    def logits(self, captured: dict[int, torch.Tensor]) -> torch.Tensor:
        """[B, K] logits of P(satisfied) from the residuals tapped at each probe's layer."""
        stacked = torch.stack([captured[p.layer] for p in self.probes])  # [K, B, d]
        return torch.einsum("kbd,kd->bk", stacked.float(), self.weights) + self.biases

    def score(self, captured: dict[int, torch.Tensor]) -> torch.Tensor:
        """[B, K] P(constraint satisfied) per row and probe."""
        return torch.sigmoid(self.logits(captured))

    @property
    def unreliable(self) -> list[str]:
        """Tasks whose probe is not marked reliable (measured at chance, or not measured)."""
        return [p.task for p in self.probes if not p.reliable]

    def muted(self, use_unreliable: bool = False) -> torch.Tensor:
        """[K] bool: probes that must not flag or steer (the unreliable ones, unless `use_unreliable`)."""
        return torch.tensor([not (use_unreliable or bool(p.reliable)) for p in self.probes], dtype=torch.bool)

    @property
    def thresholds(self) -> torch.Tensor:
        return torch.tensor([p.threshold for p in self.probes], dtype=torch.float32)

    @property
    def flag_thresholds(self) -> torch.Tensor:
        return torch.tensor([p.threshold if p.flag_threshold is None else p.flag_threshold for p in self.probes],
                            dtype=torch.float32)

    def subset(self, tasks: list[str]) -> ProbeBank:
        picked = [self.index(t) for t in tasks]
        return replace(self, probes=[self.probes[i] for i in picked], weights=self.weights[picked],
                       biases=self.biases[picked], directions=self.directions[picked])

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
            save_file({"weights": self.weights, "biases": self.biases, "directions": self.directions},
                      str(tmp / TENSORS), metadata={"format_version": str(FORMAT_VERSION)})
            manifest = {"format_version": FORMAT_VERSION, "model": self.model, "fingerprint": self.fingerprint,
                        "hidden_size": self.hidden_size, "version": self.version,
                        "probes": [asdict(p) for p in self.probes], **self.extra}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
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
        try:
            tensors = load_file(str(folder / TENSORS))
        except Exception as exc:  # safetensors raises its own SafetensorError for truncated or corrupt files
            raise BankError(f"{folder / TENSORS}: not a readable safetensors file ({_one_line(exc)})") from None
        missing = [name for name in ("weights", "biases", "directions") if name not in tensors]
        if missing:
            raise BankError(f"{folder / TENSORS}: missing tensor(s) {', '.join(missing)}")
        known = {"format_version", "model", "fingerprint", "hidden_size", "version", "probes"}
        try:
            return cls(manifest["model"], manifest["fingerprint"], manifest["hidden_size"], probes,
                       tensors["weights"], tensors["biases"], tensors["directions"], str(manifest.get("version", "0")),
                       {k: v for k, v in manifest.items() if k not in known})
        except BankError as exc:
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
    if probe.polarity != "satisfied":
        raise BankError(f"{where}.polarity must be 'satisfied' (probes output P(constraint satisfied))")
    for name in ("threshold", "flag_threshold"):
        value = getattr(probe, name)
        if value is not None and not 0 <= value <= 1:
            raise BankError(f"{where}.{name} must be a probability in [0, 1], got {value!r}")
    ci = probe.metrics.get("test_auroc_ci")
    if ci is not None:
        if not (isinstance(ci, list | tuple) and len(ci) == 2 and all(_is(x, float) for x in ci)):
            raise BankError(f"{where}.metrics.test_auroc_ci must be [low, high], got {ci!r:.80}")
        if probe.reliable and not ci[0] > 0.5:
            raise BankError(f"{where} ({probe.task}) is marked reliable but its AUROC interval {list(ci)} "
                            "reaches chance")


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
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BankError(f"{path}: bank format {manifest.get('format_version')!r:.40}, this steerer reads {FORMAT_VERSION}")
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
            groups.setdefault(probe.unreliable_reason(), []).append(probe.task)
    if not groups:
        return None
    muted = ", ".join(f"{', '.join(tasks)} ({reason})" for reason, tasks in groups.items())
    return f"steerer: muted probes, no flags or steering: {muted}; {override} to use them"


def fold_scaler(weight: torch.Tensor, bias: float, mean: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Turn a probe on standardised inputs, w . (x - mean)/scale + b, into one on raw residuals."""
    raw = weight / scale
    return raw, float(bias - (raw * mean).sum())
