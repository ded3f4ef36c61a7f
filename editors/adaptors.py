"""GRACE codebook adaptors recorded in the store, beside the weight records (:mod:`editors.weights`).

A GRACE edit changes no parameter, so its store record (a :class:`memory.ledger.WeightRecord` with method ``grace``
and no parameters) holds, instead of deltas, the one edit's codebook insert: its keys, its values (one row per entry:
the plain prompt's, and the chat-framed prompt's when the model has a chat template) and its label (the target),
with the editor's full settings (layer, ``epsilon``, ``same_key``). There is one record per edit, so deleting or
rolling back an edit removes exactly its record (all its entries).

Exactness. The adaptor of an edited model is **defined** as the replay of its applied GRACE records, in order,
through :func:`editors.methods.grace.insert_entry` (deterministic: no forward pass, no optimisation). A live apply
computes the keys and values, records them, and then replays; removing a record replays the rest. So the adaptor
after a delete is, entry for entry and bit for bit, the one a rebuild from the remaining records gives (radii an
earlier conflict shrank grow back, as if the deleted edit had never been made).

Saved with the model folder as :data:`ADAPTOR_FILE` (safetensors: ``keys``, ``values``, ``radii`` in float64,
``layer``, and ``labels`` as UTF-8 JSON bytes; no metadata map, so equal codebooks give equal bytes), written only
when the codebook has entries; :func:`load_adaptor` attaches a saved one to a model loaded from that folder, and
:func:`load_edited_model` (what ``editmem serve``, ``ask`` and ``eval`` load) does both, so a consolidated folder
answers with its adaptor wherever it is named.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from memory.errors import EditmemError, ValidationError

ADAPTOR_METHOD = "grace"
ADAPTOR_FILE = "grace-adaptor.safetensors"


def is_adaptor_record(record: Any) -> bool:
    """A store record of a GRACE codebook insert (not a weight delta)."""
    return record.method == ADAPTOR_METHOD


def pack_insert(keys: torch.Tensor, values: torch.Tensor, label: str) -> bytes:
    """One edit's codebook insert (``keys`` (k, d_in) and ``values`` (k, d_out), or one entry's 1-D key and value)
    as the blob its record keeps in place of deltas."""
    from safetensors.torch import save

    keys, values = torch.atleast_2d(keys.detach()), torch.atleast_2d(values.detach())
    if keys.shape[0] != values.shape[0]:
        raise ValidationError(f"a GRACE insert needs one value per key ({keys.shape[0]} keys, {values.shape[0]} "
                              "values)")
    return save({"key": keys.float().cpu().contiguous(), "value": values.float().cpu().contiguous(),
                 "label": torch.tensor(list(label.encode("utf-8")), dtype=torch.uint8)})


def unpack_insert(blob: bytes) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(keys (k, d_in), values (k, d_out), label)`` of a recorded insert (a record written before edits had
    several entries holds 1-D tensors: one entry)."""
    from safetensors.torch import load

    t = load(blob)
    return torch.atleast_2d(t["key"]), torch.atleast_2d(t["value"]), bytes(t["label"].tolist()).decode("utf-8")


def record_settings(settings: Any, layer: int) -> dict[str, Any]:
    """The settings a GRACE record keeps: every field of the editor's settings, the layer resolved."""
    out = dataclasses.asdict(settings)
    out["layer"] = int(layer)
    return out


def replay(book: Any, inserts: Iterable[tuple[Mapping[str, Any], bytes]]) -> None:
    """Make ``book`` the codebook of ``inserts`` ((settings, blob) per applied record, in order) from empty."""
    from editors.methods.grace import insert_edit

    book.clear()
    for settings, blob in inserts:
        if int(settings["layer"]) != book.layer:
            raise EditmemError(f"a GRACE record is at layer {settings['layer']}, the model's adaptor at {book.layer}")
        keys, values, label = unpack_insert(blob)
        insert_edit(book, [], keys, values, label, epsilon=float(settings["epsilon"]),
                    same_key=float(settings["same_key"]))
    book.changed()


def adaptor_bytes(book: Any) -> bytes:
    """The codebook as the saved file's bytes (entries in id order). Equal codebooks give equal bytes."""
    from safetensors.torch import save

    entries = [book.entries[i] for i in sorted(book.entries)]
    if not entries:
        raise ValidationError("the codebook is empty: nothing to save")
    labels = json.dumps([e.label for e in entries]).encode("utf-8")
    tensors = {"keys": torch.stack([e.key for e in entries]).float().contiguous(),
               "values": torch.stack([e.value for e in entries]).float().contiguous(),
               "radii": torch.tensor([e.radius for e in entries], dtype=torch.float64),
               "layer": torch.tensor([book.layer], dtype=torch.int64),
               "labels": torch.tensor(list(labels), dtype=torch.uint8)}
    return save(tensors)  # no metadata: safetensors writes its metadata map in no fixed order


def load_adaptor(model: torch.nn.Module, folder: str | Path) -> Any:
    """Attach the adaptor saved in model folder ``folder`` (if any) to ``model``; returns its codebook or None."""
    from safetensors import safe_open

    from editors.methods.grace import Codebook, Entry

    path = Path(folder) / ADAPTOR_FILE
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        if set(f.keys()) != {"keys", "values", "radii", "layer", "labels"}:
            raise EditmemError(f"{path}: not a saved GRACE adaptor")
        keys, values, radii = f.get_tensor("keys"), f.get_tensor("values"), f.get_tensor("radii")
        layer, labels = int(f.get_tensor("layer")[0]), json.loads(bytes(f.get_tensor("labels").tolist()))
    book = Codebook(model, layer)
    for i, label in enumerate(labels):
        book.entries[i] = Entry(book.new_id(), keys[i].clone(), values[i].clone(), float(radii[i]), label)
    book.changed()
    return book


def load_edited_model(name_or_path: str | Path) -> tuple[Any, Any]:
    """``load_model(name_or_path)`` with the folder's saved GRACE adaptor (if any) attached: the model a consolidated
    folder holds is its weights *and* its codebook. Returns ``(model, tokenizer)``."""
    import logging

    from editors.lm.loading import load_model, resolve_model

    model, tokenizer = load_model(name_or_path)
    book = load_adaptor(model, resolve_model(name_or_path))
    if book is not None:
        logging.getLogger(__name__).info("attached the GRACE adaptor of %s: %d entries at layer %d", name_or_path,
                                         len(book.entries), book.layer)
    return model, tokenizer
