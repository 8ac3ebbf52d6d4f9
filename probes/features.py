"""Activations by teacher forcing: residuals of a committed text corpus, recomputed in batched passes.

Generating the corpus takes hours; its activations take one forward pass per response over prompt +
response (+ the EOS token where the response ended with one), with the tokens the model actually sampled
(`token_ids`), so the residuals are the ones the live monitor read while generating (a test checks they
match the generation-time taps). The cache is local (a few GB) and incremental: a rerun after the corpus
grew computes only the new rows.

Reading indices follow the live monitor's: -1 = the last prompt token (whose output chose the first
token), i = the pass that fed generated token i; a response that ended with EOS has one more pass (index
n, the EOS token), a response cut by its budget ends at the last pass live generation ran (index n - 2:
its last sampled token is never fed). Positions are `probes.dataset.POSITIONS` at those indices, so the
arrays are the ones the on-policy dataset recorded while generating, and train/report code reads either.

Layout of a cache folder ``{out}/{task}/NNNN.safetensors`` + ``NNNN.json`` per chunk of corpus rows:
    positions   [n, P, L, d] fp16: every layer at each of POSITIONS (last prompt, first, body deciles, EOS)
    tokens      [sum T, Lt, d] fp16: every pass from 0 to the end reading at `token_layers`
    offsets     [n + 1] row starts in `tokens`
The json names the rows (ids) so a chunk is recomputed when the corpus under it changed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from probes.dataset import TaskData, position_indices
from probes.plan import FeatureLayout, default_token_layers
from steerer.model import LoadedModel, chat_prompt
from steerer.taps import decoder_layers, layout_for

CHUNK_ROWS = 64
FORMAT = 1
FEATURES = Path(__file__).resolve().parents[1] / "data" / "features"


def default_features(model_name: str) -> Path:
    """data/features/{model} (gitignored): a local cache, recomputed from the committed corpus."""
    from probes.corpus import default_out

    return FEATURES / default_out(model_name).name


@dataclass(frozen=True)
class ForcedSequence:
    """One response to featurise: the full token sequence and where its readings sit in it."""

    ids: list[int]
    prompt_len: int
    n_tokens: int
    ended_by_eos: bool

    def position(self, index: int) -> int:
        """Sequence position of reading `index` (-1 = last prompt token)."""
        return self.prompt_len + index

    @property
    def last_index(self) -> int:
        """The last reading live generation took: the EOS pass, or the pass before a cut row's last token."""
        return position_indices(self.n_tokens, self.ended_by_eos)[-1]


def sequence_for(lm: LoadedModel, row: dict) -> ForcedSequence:
    """Prompt ids from the row's messages (the model's chat template, as generation used), its sampled
    tokens, and the EOS token (the tokenizer's) where the row ended with one."""
    prompt = chat_prompt(lm.tokenizer, row["messages"])
    tokens = list(row["token_ids"])
    ended = row["finish_reason"] == "eos"
    extra = [int(lm.tokenizer.eos_token_id)] if ended else []
    return ForcedSequence(prompt + tokens + extra, len(prompt), len(tokens), ended)


@torch.inference_mode()
def residual_passes(lm: LoadedModel, seqs: Sequence[ForcedSequence], layers: Sequence[int]) -> list[torch.Tensor]:
    """Per sequence, [T, len(layers), d] residuals after each of `layers` at every position (fp32).

    Right-padded batch with an attention mask: causal attention keeps padding off the real positions, and
    position ids start at 0 for every row as in generation. The LM head is skipped (no logits needed)."""
    model = lm.model
    layout = layout_for(model)
    blocks = decoder_layers(model, layout)
    captured: dict[int, torch.Tensor] = {}

    def hook_for(layer: int):
        def hook(module, args, output):
            captured[layer] = layout.read(output, lambda x: x)
        return hook

    handles = [blocks[layer].register_forward_hook(hook_for(layer)) for layer in layers]
    try:
        width = max(len(s.ids) for s in seqs)
        device = next(model.parameters()).device
        pad = int(lm.tokenizer.pad_token_id)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long, device=device)
        mask = torch.zeros((len(seqs), width), dtype=torch.long, device=device)
        for i, s in enumerate(seqs):
            ids[i, : len(s.ids)] = torch.tensor(s.ids, dtype=torch.long)
            mask[i, : len(s.ids)] = 1
        base = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
        stop_after = max(layers)
        _run_until(base, blocks, stop_after, ids, mask)
        stacked = torch.stack([captured[layer] for layer in layers], dim=2).float()  # [B, T, L, d]
    finally:
        for handle in handles:
            handle.remove()
    return [stacked[i, : len(s.ids)].cpu() for i, s in enumerate(seqs)]


class _Stop(Exception):
    pass


def _run_until(base, blocks, last_layer: int, ids: torch.Tensor, mask: torch.Tensor) -> None:
    """Forward the decoder, stopping after `last_layer` (later layers are not needed)."""
    def stop(module, args, output):
        raise _Stop

    handle = blocks[last_layer].register_forward_hook(stop) if last_layer < len(blocks) - 1 else None
    try:
        base(input_ids=ids, attention_mask=mask, use_cache=False)
    except _Stop:
        pass
    finally:
        if handle is not None:
            handle.remove()


def featurise_rows(lm: LoadedModel, rows: list[dict], token_layers: Sequence[int], batch_tokens: int = 4096,
                   position_layers: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """The cached arrays for `rows` (in their order), batching by length so little is padding; positions at
    `position_layers` (None: every layer), and only the layers stored are captured."""
    kept = list(range(lm.num_layers)) if position_layers is None else list(position_layers)
    layers = sorted({*kept, *token_layers})
    token_cols = [layers.index(layer) for layer in token_layers]
    position_cols = [layers.index(layer) for layer in kept]
    seqs = [sequence_for(lm, r) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: len(seqs[i].ids))
    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    i = 0
    while i < len(order):
        j = i + 1
        while j < len(order) and (j - i + 1) * len(seqs[order[j]].ids) <= batch_tokens:
            j += 1
        batch = [seqs[k] for k in order[i:j]]
        for k, res in zip(order[i:j], residual_passes(lm, batch, layers), strict=True):
            s = seqs[k]
            picks = [s.position(index) for index in position_indices(s.n_tokens, s.ended_by_eos)]
            passes = res[s.position(0): s.position(s.last_index) + 1] if s.last_index >= 0 else res[:0]
            out[k] = (res[picks][:, position_cols], passes[:, token_cols])
        i = j
    ordered = [out[k] for k in range(len(rows))]
    lengths = [o[1].shape[0] for o in ordered]
    return {"positions": torch.stack([o[0] for o in ordered]).half().contiguous(),
            "tokens": torch.cat([o[1] for o in ordered]).half().contiguous(),
            "offsets": torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.long)}


def featurise(lm: LoadedModel, rows_by_task: dict[str, list[dict]], out: Path,
              token_layers: Sequence[int] | None = None, progress: bool = True,
              layout: FeatureLayout | None = None) -> dict:
    """Fill the cache under `out` for every row (chunks already computed for the same rows are kept).
    `layout` (`probes.plan.feature_layout`, the one the build's plan priced) overrides `token_layers`."""
    token_layers = tuple(layout.token_layers if layout else token_layers or default_token_layers(lm.num_layers))
    position_layers = layout.position_layers if layout else None
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"format": FORMAT, "model": lm.name, "fingerprint": lm.fingerprint, "hidden_size": lm.hidden_size,
                "layers": list(range(lm.num_layers)), "token_layers": list(token_layers), "chunk_rows": CHUNK_ROWS}
    if position_layers is not None:  # only then: caches written before this key existed stay valid
        manifest["position_layers"] = list(position_layers)
    old = out / "manifest.json"
    if old.exists():
        previous = json.loads(old.read_text())
        if {k: previous.get(k) for k in manifest} != manifest:
            raise ValueError(f"{out} holds features of another model or layout ({previous.get('model')}, "
                             f"token layers {previous.get('token_layers')}): use another --features folder")
    old.write_text(json.dumps(manifest, indent=1))
    todo = []
    for task, rows in rows_by_task.items():
        for c in range(0, len(rows), CHUNK_ROWS):
            chunk_rows = rows[c: c + CHUNK_ROWS]
            path = out / task / f"{c // CHUNK_ROWS:04d}"
            if _chunk_ids(path) != [r["id"] for r in chunk_rows]:
                todo.append((path, chunk_rows))
    bar = tqdm(total=sum(len(r) for _, r in todo), desc="features", unit="resp", disable=not progress)
    for path, chunk_rows in todo:
        arrays = featurise_rows(lm, chunk_rows, token_layers, position_layers=position_layers)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(arrays, str(path.with_suffix(".safetensors")))
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"ids": [r["id"] for r in chunk_rows]}))
        tmp.rename(path.with_suffix(".json"))  # written last: marks the chunk complete
        bar.update(len(chunk_rows))
    bar.close()
    return manifest


def _chunk_ids(path: Path) -> list[str] | None:
    meta = path.with_suffix(".json")
    if not meta.exists() or not path.with_suffix(".safetensors").exists():
        return None
    return json.loads(meta.read_text())["ids"]


def load_features(out: Path, task: str, rows: list[dict], partial: bool = False) -> TaskData:
    """The cached activations of `rows` (a task's corpus rows in corpus order) as a `TaskData`; missing or
    stale chunks are an error that names the command computing them (with `partial`, the rows up to the first
    missing chunk: for a look at a corpus still growing)."""
    positions, tokens, offsets = [], [], [0]
    manifest = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").exists() else {}
    for c in range(0, len(rows), CHUNK_ROWS):
        path = out / task / f"{c // CHUNK_ROWS:04d}"
        ids = [r["id"] for r in rows[c: c + CHUNK_ROWS]]
        if _chunk_ids(path) != ids and partial and c > 0:
            rows = rows[:c]
            break
        if _chunk_ids(path) != ids:
            raise FileNotFoundError(f"features for {task} rows {c}..{c + len(ids) - 1} are missing or stale under "
                                    f"{out}: run `steerer probes build`")
        arrays = load_file(str(path.with_suffix(".safetensors")))
        positions.append(arrays["positions"])
        tokens.append(arrays["tokens"])
        offsets += (arrays["offsets"][1:] + offsets[-1]).tolist()
    return TaskData(rows, _every_layer(torch.cat(positions).float(), manifest), torch.cat(tokens),
                    torch.tensor(offsets))


def _every_layer(positions: torch.Tensor, manifest: dict) -> torch.Tensor:
    """Positions stored at some layers only (a large model's layout) widened to [N, P, L, d] so readers index
    by layer number; the layers not stored are zeros and are never candidates (they are not token layers)."""
    kept = manifest.get("position_layers")
    if kept is None:
        return positions
    full = positions.new_zeros((*positions.shape[:2], len(manifest["layers"]), positions.shape[-1]))
    full[:, :, kept] = positions
    return full
