"""The probe bank: one linear probe per task at its own layer, stored as data (safetensors + JSON).

Probes are kept in raw residual space: the training scaler is folded into the weights, so scoring a
token is one batched matmul over the tapped residuals, `sigmoid(x @ w + b)` = P(constraint satisfied).
Each probe also carries a unit steering direction, signed toward satisfaction.
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
    metrics: dict = field(default_factory=dict)  # test auroc / accuracy / n etc.


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
        k, d = len(self.probes), self.hidden_size
        for name, shape in (("weights", (k, d)), ("biases", (k,)), ("directions", (k, d))):
            tensor = getattr(self, name)
            if tuple(tensor.shape) != shape:
                raise BankError(f"bank {name} has shape {tuple(tensor.shape)}, expected {shape}")
            setattr(self, name, tensor.float().contiguous())
        self._layer_of = torch.tensor([p.layer for p in self.probes], dtype=torch.long)

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
        folder = Path(folder) if folder else DEFAULT_BANK
        if not (folder / MANIFEST).is_file() or not (folder / TENSORS).is_file():
            raise BankError(f"no probe bank at {folder} (needs {MANIFEST} and {TENSORS})")
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except json.JSONDecodeError as exc:
            raise BankError(f"{folder / MANIFEST}: not valid JSON ({exc})") from exc
        if manifest.get("format_version") != FORMAT_VERSION:
            raise BankError(f"{folder}: bank format {manifest.get('format_version')}, this steerer reads {FORMAT_VERSION}")
        tensors = load_file(str(folder / TENSORS))
        known = {"format_version", "model", "fingerprint", "hidden_size", "version", "probes"}
        probes = [Probe(**p) for p in manifest["probes"]]
        bank = cls(manifest["model"], manifest["fingerprint"], int(manifest["hidden_size"]), probes,
                   tensors["weights"], tensors["biases"], tensors["directions"], str(manifest.get("version", "0")),
                   {k: v for k, v in manifest.items() if k not in known})
        if not all(math.isfinite(float(x)) for x in bank.biases):
            raise BankError(f"{folder}: non-finite probe biases")
        return bank


def fold_scaler(weight: torch.Tensor, bias: float, mean: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Turn a probe on standardised inputs, w . (x - mean)/scale + b, into one on raw residuals."""
    raw = weight / scale
    return raw, float(bias - (raw * mean).sum())
