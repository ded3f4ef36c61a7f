"""MEND checkpoints: where they live, saving a trained network with its settings and history, loading one for a
model (refused when the fingerprint differs)."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from editors.lm.architectures import (
    CausalLM,
    model_fingerprint,
    param_name,
)
from editors.methods.mend.network import MENDNet
from editors.methods.mend.training import MENDTrainSettings, TrainResult, new_network
from memory.errors import EditmemError, ValidationError
from memory.paths import cache_dir

log = logging.getLogger(__name__)


CHECKPOINT_FORMAT = 1
WEIGHTS_FILE = "mend.pt"
CONFIG_FILE = "config.json"
HISTORY_FILE = "history.json"


class MendCheckpointError(EditmemError):
    """A MEND checkpoint that is missing, unreadable, or made for another model."""


def checkpoint_folder(name_or_path: str | Path) -> Path:
    """Where a checkpoint lives: a path (containing a separator, or an existing folder) as given, else
    ``$EDITMEM_CACHE/mend/NAME``."""
    text = str(name_or_path)
    if not text.strip():
        raise ValidationError("a MEND checkpoint needs a name or a folder")
    path = Path(text).expanduser()
    if "/" in text or "\\" in text or path.is_dir():
        return path
    return cache_dir() / "mend" / text


def save_checkpoint(result: TrainResult, model: CausalLM, name_or_path: str | Path) -> Path:
    """Write ``result`` as a checkpoint folder for ``model`` and return the folder."""
    folder = checkpoint_folder(name_or_path)
    folder.mkdir(parents=True, exist_ok=True)
    params = dict(model.named_parameters())
    names = [param_name(model, layer, "mlp_out") for layer in result.layers]
    config = {
        "format": CHECKPOINT_FORMAT,
        "method": "mend",
        "fingerprint": model_fingerprint(model),
        "model_type": model.config.model_type,
        "layers": list(result.layers),
        "params": {n: list(params[n].shape) for n in names},
        "d_in": result.net.d_in,
        "d_out": result.net.d_out,
        "settings": dataclasses.asdict(result.settings),
        "training": {"steps": result.steps, "seconds": round(result.seconds, 1), "stopped": result.stopped,
                     "train_edits": result.n_train, "val_edits": result.n_val},
        "best_validation": result.best,
    }
    torch.save({"format": CHECKPOINT_FORMAT, "fingerprint": config["fingerprint"],
                "state": {k: v.detach().cpu() for k, v in result.net.state_dict().items()}}, folder / WEIGHTS_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    (folder / HISTORY_FILE).write_text(json.dumps(result.history, indent=1))
    return folder


@dataclass
class LoadedMEND:
    net: MENDNet
    layers: tuple[int, ...]
    settings: MENDTrainSettings
    config: dict[str, Any]
    folder: Path


def load_checkpoint(name_or_path: str | Path, model: torch.nn.Module) -> LoadedMEND:
    """The hypernetwork saved at ``name_or_path`` for ``model``; :class:`MendCheckpointError` if it is missing,
    unreadable, or was trained for another model (its base model fingerprint differs)."""
    folder = checkpoint_folder(name_or_path)
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise MendCheckpointError(f"no MEND checkpoint at {folder} (expected {CONFIG_FILE} and {WEIGHTS_FILE}); "
                                  "train one with `editmem train-mend --model MODEL --data FILE --out NAME`")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
        blob = torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise MendCheckpointError(f"cannot read the MEND checkpoint at {folder}: {err}") from err
    if config.get("format") != CHECKPOINT_FORMAT or blob.get("format") != CHECKPOINT_FORMAT:
        raise MendCheckpointError(f"{folder}: unsupported MEND checkpoint format {config.get('format')!r} "
                                  f"(this editmem reads format {CHECKPOINT_FORMAT})")
    mine = model_fingerprint(model)
    if config.get("fingerprint") != mine or blob.get("fingerprint") != mine:
        raise MendCheckpointError(
            f"the MEND checkpoint at {folder} was trained for another model (fingerprint {config.get('fingerprint')},"
            f" {config.get('model_type')}); this model's fingerprint is {mine}. Train one for this model with "
            "`editmem train-mend`")
    params = dict(model.named_parameters())
    layers = tuple(config["layers"])
    for _layer, (name, shape) in zip(layers, config["params"].items()):
        if name not in params or list(params[name].shape) != shape:
            raise MendCheckpointError(f"{folder}: the checkpoint edits {name} {shape}, which this model does not "
                                      "have in that shape")
    settings = MENDTrainSettings(**{**config["settings"], "layers": tuple(layers)})
    with torch.random.fork_rng(devices=[]):
        net, _ = new_network(model, settings)
    try:
        net.load_state_dict(blob["state"])
    except RuntimeError as err:
        raise MendCheckpointError(f"{folder}: the saved hypernetwork does not match its config: {err}") from err
    net.eval()
    return LoadedMEND(net, layers, settings, config, folder)
