"""``grace``: a codebook adaptor at one layer (Hartvigsen et al. NeurIPS 2023, "Aging with GRACE: Lifelong Model
Editing with Discrete Key-Value Adaptors").

The weights are never changed. A forward hook on one layer's MLP output projection (``mlp_out`` of
:mod:`editors.lm.architectures`) holds a codebook of entries ``(key, value, radius)``:

- the **key** of an edit is the projection's input at the prompt's last token (the bare prompt);
- its **value** replaces the projection's output there: ``v0 + delta`` with ``delta`` optimised as ROME optimises its
  value (:func:`editors.locate.values.optimize_value`, at the prompt's last token, no context prefixes, no KL term
  by default), so the edited model says the new target after the prompt;
- with ``chat_key`` (the default) and a tokenizer that has a chat template, the edit gets a **second entry** keyed at
  the last token of the prompt as the user's message in that template (the assistant header), its value optimised so the
  assistant's answer starts with the target. A chat model is asked through its template, and the plain prompt's key
  never matches there (SmolLM2-135M, the default layer: the chat-framed question's key is at median 0.52 of its norm
  from the plain one's nearest entry, far outside ``epsilon``); without the second entry GRACE edits nothing a chat user
  sees (1,000 edits: generated reliability 0.01 against 0.997 teacher-forced, BENCHMARKS.md). That value is further from
  the unedited output (the header is not yet an answer), so it gets its own optimiser settings (``chat_v_lr`` 1.0,
  ``chat_v_steps`` 60: with the plain prompt's 0.5 and 25, multi-token targets such as "Philadelphia" stopped at a loss
  of 1.7). With ``chat_stop`` (the default) that value is optimised for the target followed by the tokenizer's eos (the
  end of the assistant's turn), so the answer is the target and stops: without it the edited position kept pulling later
  tokens to the target, and SmolLM2 answered "CBS.CBS.CBS." or "politicianpolitician...", which the generation protocol
  rightly scores as wrong. The six generated failures among the 50 cases sampled at 1,000 edits in BENCHMARKS.md
  lifelong round 8 were all of this kind (five repeated the target, one ran "Sony" on into "Sonya, a ..."); edited alone
  with it, all six answer the bare target. The extra target token costs more optimisation steps;
- at every position of every forward pass, the input's nearest key (Euclidean) decides: within that entry's
  **radius** the output there is replaced by its value; outside every radius the layer's output is returned as it
  was (the hook returns nothing, so the outputs are bit-identical to the base model's).

A new edit's radius is ``epsilon * ||key||`` (``epsilon`` relative, so one setting fits any key scale). As in GRACE,
an edit whose key falls near an existing entry (the two balls overlap) either extends that entry's radius to cover
it (same target) or splits the two (different target: both radii become half their distance); an edit whose key is
the same as an entry's (distance at most ``same_key`` times its norm: the same prompt again) updates that entry's
value. :class:`GraceHandle` records what its edit did (entries added, values replaced, radii changed) and
``restore()`` undoes it exactly (in reverse order of the edits, which is how the harness restores); when the codebook
is empty the hook is removed, so the model is the base model again.

Defaults: the layer at 85% of the depth (SmolLM2-135M: 26 of 30, ``round(25.5)``; GRACE edits a late layer, e.g.
EasyEdit's 27 of 32 for Llama-2-7B), ``epsilon`` 0.1, value optimisation lr 0.5, 25 passes, clamp factor 4, no
weight decay, stop below loss 0.05.
"""

from __future__ import annotations

import itertools
import operator
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from editors.base import EditHandle, Editor, EditorSettings, EditRequest, check_requests, register_editor
from editors.lm.architectures import arch_spec, check_layer, layer_module, num_layers
from editors.lm.chat import chat_text
from editors.locate.keys import activations_at, encode_row
from editors.locate.values import ValueOptions, optimize_value
from memory.checks import check_flag, check_number
from memory.errors import EditmemError, ValidationError

DEFAULT_LAYER_FRACTION = 0.85


def grace_default_layer(model: torch.nn.Module) -> int:
    """``round(num_layers * 0.85)``, at most the last layer (SmolLM2-135M: 26, Python rounding 25.5 to even; a 4-layer
    test model: 3)."""
    n = num_layers(model)
    return min(n - 1, round(n * DEFAULT_LAYER_FRACTION))


@dataclass(frozen=True)
class GraceSettings(EditorSettings):
    layer: int | None = None  # None: grace_default_layer(model)
    epsilon: float = 0.1
    same_key: float = 1e-4
    v_lr: float = 0.5
    v_steps: int = 25
    v_weight_decay: float = 0.0
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0
    early_stop_loss: float | None = 0.05
    chat_key: bool = True  # a second entry at the prompt in the model's chat template (when it has one)
    # its value is further from the unedited output (the assistant header is not yet an answer): more, larger steps
    chat_v_lr: float = 1.0
    chat_v_steps: int = 60
    # the chat entry's value is optimised for the target followed by the end of the assistant's turn (the tokenizer's
    # eos token), so the answer stops after the target instead of repeating it
    chat_stop: bool = True

    def __post_init__(self) -> None:
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)
                                       or self.layer < 0):
            raise ValidationError(f"GRACE setting layer must be a layer index >= 0 or None, not {self.layer!r}")
        check_flag("GRACE", "chat_key", self.chat_key)
        check_flag("GRACE", "chat_stop", self.chat_stop)
        check_number("GRACE", "epsilon", self.epsilon)
        check_number("GRACE", "same_key", self.same_key, strict=False)
        check_number("GRACE", "v_lr", self.v_lr)
        check_number("GRACE", "v_steps", self.v_steps, integer=True)
        check_number("GRACE", "chat_v_lr", self.chat_v_lr)
        check_number("GRACE", "chat_v_steps", self.chat_v_steps, integer=True)
        check_number("GRACE", "v_weight_decay", self.v_weight_decay, strict=False)
        check_number("GRACE", "clamp_norm_factor", self.clamp_norm_factor)
        check_number("GRACE", "kl_factor", self.kl_factor, strict=False)
        if self.early_stop_loss is not None:
            check_number("GRACE", "early_stop_loss", self.early_stop_loss)

    def value_options(self, *, chat: bool = False) -> ValueOptions:
        return ValueOptions(lr=self.chat_v_lr if chat else self.v_lr, steps=self.chat_v_steps if chat else self.v_steps,
                            weight_decay=self.v_weight_decay, clamp_norm_factor=self.clamp_norm_factor,
                            kl_factor=self.kl_factor, early_stop_loss=self.early_stop_loss)


@dataclass
class Entry:
    """One codebook entry (``key`` (d_in,), ``value`` (d_out,), both float32 on the CPU)."""

    id: int
    key: torch.Tensor
    value: torch.Tensor
    radius: float
    label: str

    def state(self) -> dict[str, Any]:
        return {"id": self.id, "key": self.key, "value": self.value, "radius": self.radius, "label": self.label}

    @classmethod
    def from_state(cls, s: dict[str, Any]) -> Entry:
        return cls(int(s["id"]), s["key"], s["value"], float(s["radius"]), str(s["label"]))


# id(module) -> the codebook hooked on it (Codebook.on). Weak values: a hooked codebook keeps its module alive (so the
# id is not reused while the entry exists), and the entry goes with the codebook.
_HOOKED: weakref.WeakValueDictionary[int, Codebook] = weakref.WeakValueDictionary()


class Codebook:
    """The entries and the forward hook on the layer's MLP output projection (present only while not empty)."""

    def __init__(self, model: torch.nn.Module, layer: int, *, attach: bool = True):
        self.model, self.layer = model, layer
        self.module = layer_module(model, layer, "mlp_out")
        self.entries: dict[int, Entry] = {}
        self._ids = itertools.count()
        self._hook: Any = None
        self._tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._rows: tuple[list[Entry], Any] = ([], None)  # nearest()'s stacked keys (_key_rows)
        self.enabled = True
        self.attach = attach  # False: built aside (its entries later taken by a hooked one), never hooked itself

    @classmethod
    def on(cls, model: torch.nn.Module, layer: int) -> Codebook:
        """The codebook hooked on ``model``'s layer ``layer`` now (say one :func:`editors.adaptors.load_adaptor`
        attached), so that a second one does not hook the same module; a new one when there is none."""
        found = _HOOKED.get(id(layer_module(model, layer, "mlp_out")))
        return found if found is not None else cls(model, layer)

    def take(self, other: Codebook) -> None:
        """Hold ``other``'s entries (the same ids, numbering on from them) in place of this codebook's; ``other`` is
        left empty. No forward pass may run meanwhile (:class:`editors.consolidation.LiveWeights` holds the lock its
        server's generate calls hold)."""
        if other.layer != self.layer:
            raise EditmemError(f"a codebook at layer {other.layer} cannot replace one at layer {self.layer}")
        self.entries, self._ids, other.entries, other._ids = other.entries, other._ids, {}, itertools.count()
        self.changed()

    def new_id(self) -> int:
        return next(self._ids)

    def clear(self) -> None:
        """No entries, ids from 0 again (a codebook replayed from the store numbers its entries in order)."""
        self.entries = {}
        self._ids = itertools.count()
        self.changed()

    def changed(self) -> None:
        self._tensors = None
        if self.entries and self._hook is None and self.attach:
            self._hook = self.module.register_forward_hook(self._forward)
            _HOOKED[id(self.module)] = self
        elif not self.entries and self._hook is not None:
            self._hook.remove()
            self._hook = None
            if _HOOKED.get(id(self.module)) is self:
                del _HOOKED[id(self.module)]

    def nearest(self, key: torch.Tensor) -> tuple[Entry, float] | None:
        """The entry whose key is nearest ``key`` (the first in insertion order on a tie) and its distance."""
        if not self.entries:
            return None
        entries, keys = self._key_rows()
        dist = torch.linalg.vector_norm(keys - key, dim=1)
        i = int(torch.argmin(dist))
        return entries[i], float(dist[i])

    def _key_rows(self) -> tuple[list[Entry], torch.Tensor]:
        """The entries in insertion order and their keys stacked, (n, d_in). Kept between calls and extended when
        entries were only added since (a replay inserts thousands one by one: restacking every key for each would be
        quadratic); rebuilt when any earlier entry went or changed. Entries' keys never change."""
        entries = list(self.entries.values())
        cached, buf = self._rows
        n = len(cached)
        if n > len(entries) or not all(map(operator.is_, entries[:n], cached)):
            cached, buf, n = [], None, 0
        if len(entries) > n:
            new = torch.stack([e.key for e in entries[n:]])
            if buf is None or len(entries) > buf.shape[0]:
                grown = new.new_empty((max(len(entries), 2 * n, 64), new.shape[1]))
                if n:
                    grown[:n] = buf[:n]
                buf = grown
            buf[n:len(entries)] = new
            cached = entries
        self._rows = (cached, buf)
        return cached, buf[:len(cached)]

    def _stacked(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._tensors is None or self._tensors[0].device != device:
            entries = list(self.entries.values())
            self._tensors = (torch.stack([e.key for e in entries]).to(device),
                             torch.stack([e.value for e in entries]).to(device),
                             torch.tensor([e.radius for e in entries], dtype=torch.float32, device=device))
        return self._tensors

    def _forward(self, _module: torch.nn.Module, args: tuple, output: Any) -> Any:
        if not self.enabled or not self.entries or not isinstance(output, torch.Tensor) or not args:
            return None
        x = args[0]
        keys, values, radii = self._stacked(x.device)
        flat = x.reshape(-1, x.shape[-1]).float()
        dist = torch.cdist(flat, keys)  # (B*T, m)
        best, which = dist.min(dim=1)
        hit = best <= radii[which]
        if not bool(hit.any()):
            return None  # outside every radius: the layer's own output, untouched
        out = output.reshape(-1, output.shape[-1]).clone()
        out[hit] = values[which[hit]].to(out.dtype)
        return out.view_as(output)


@dataclass
class GraceHandle(EditHandle):
    """What one GRACE ``apply`` did to the codebook, in order: ``("add", entry)``, ``("value", entry id, old value,
    old label)``, ``("radius", entry id, old radius)``; ``restore()`` undoes it in reverse."""

    codebook: Codebook
    ops: list[tuple[Any, ...]] = field(default_factory=list)
    applied: bool = True
    # (keys (k, d_in), values (k, d_out), label) of each request, in order: its k entries (the plain prompt's, then
    # the chat-framed one's); what the store records (editors.adaptors) and replays
    inserted: list[tuple[torch.Tensor, torch.Tensor, str]] = field(default_factory=list)

    def restore(self) -> None:
        if not self.applied:
            return
        book = self.codebook
        for op in reversed(self.ops):
            if op[0] == "add":
                book.entries.pop(op[1].id, None)
            elif op[0] == "value" and op[1] in book.entries:
                book.entries[op[1]].value, book.entries[op[1]].label = op[2], op[3]
            elif op[0] == "radius" and op[1] in book.entries:
                book.entries[op[1]].radius = op[2]
        book.changed()
        self.applied = False

    def entries(self) -> list[Entry]:
        """The entries this edit added or changed, as they are now."""
        ids = [op[1].id if op[0] == "add" else op[1] for op in self.ops]
        return [self.codebook.entries[i] for i in dict.fromkeys(ids) if i in self.codebook.entries]

    def state_dict(self) -> dict[str, Any]:
        return {"layer": self.codebook.layer, "entries": [e.state() for e in self.entries()]}

    @classmethod
    def load(cls, path: str | Path, editor: GraceEditor) -> GraceHandle:
        """Write a saved edit's entries into ``editor``'s codebook again (as new entries or updates of the same ids
        missing there); returns the handle undoing that."""
        blob = torch.load(Path(path), map_location="cpu", weights_only=True)
        if blob.get("kind") != cls.__name__:
            raise EditmemError(f"{path}: not a saved GRACE edit (kind {blob.get('kind')!r})")
        book = editor.codebook()
        if int(blob["state"]["layer"]) != book.layer:
            raise EditmemError(f"{path}: the saved edit is at layer {blob['state']['layer']}, the editor's at "
                               f"{book.layer}")
        handle = cls(book)
        for state in blob["state"]["entries"]:
            entry = Entry.from_state(state)
            entry.id = book.new_id()
            book.entries[entry.id] = entry
            handle.ops.append(("add", entry))
        book.changed()
        return handle


@register_editor
class GraceEditor(Editor):
    """Edits held in a codebook adaptor at one layer (see the module docstring)."""

    name = "grace"
    Settings = GraceSettings
    settings: GraceSettings

    def __init__(self, model: torch.nn.Module, tokenizer: Any, settings: EditorSettings | None = None):
        super().__init__(model, tokenizer, settings)
        arch_spec(model)
        self._codebook: Codebook | None = None
        self.last_stats: dict[str, Any] = {}

    @classmethod
    def default_settings(cls, model: torch.nn.Module) -> GraceSettings:
        return GraceSettings(layer=grace_default_layer(model))

    def codebook(self) -> Codebook:
        if self._codebook is None:
            layer = self.settings.layer if self.settings.layer is not None else grace_default_layer(self.model)
            self._codebook = Codebook(self.model, check_layer(self.model, layer, self.name))
        return self._codebook

    def key_texts(self, request: EditRequest) -> list[tuple[str, str]]:
        """(prompt text, target) of each entry the edit gets: the bare prompt, and with ``chat_key`` the prompt as
        the user's message in the chat template (the answer starting right after the assistant header)."""
        texts = [(request.prompt, request.target_new)]
        framed = chat_text(self.tokenizer, request.prompt) if self.settings.chat_key else None
        if framed is not None:
            eos = getattr(self.tokenizer, "eos_token", None) if self.settings.chat_stop else None
            texts.append((framed, request.target_new.strip() + (eos or "")))
        return texts

    def key_value(self, request: EditRequest) -> tuple[torch.Tensor, torch.Tensor]:
        """The edit's keys ``(k, d_in)`` and the values ``(k, d_out)`` to put there, one row per entry of
        :meth:`key_texts` (the codebook off while they are computed)."""
        book = self.codebook()
        keys, values = [], []
        book.enabled = False
        try:
            for n, (prompt, target) in enumerate(self.key_texts(request)):
                at_end = EditRequest(prompt, target, subject=prompt)  # key: the prompt's last token
                row = encode_row(self.tokenizer, "", prompt, prompt)
                keys.append(activations_at(self.model, self.tokenizer, [row], {"k": (book.module, "input")},
                                           stop=book.module)["k"][0].float().cpu())
                result = optimize_value(self.model, self.tokenizer, at_end, ("",), book.module,
                                        self.settings.value_options(chat=n > 0))
                values.append((result.v0 + result.delta).detach().float().cpu())
        finally:
            book.enabled = True
        return torch.stack(keys), torch.stack(values)

    def apply(self, requests: Sequence[EditRequest]) -> GraceHandle:
        requests = check_requests(requests, "GRACE")
        book = self.codebook()
        handle = GraceHandle(book)
        for request in requests:
            keys, values = self.key_value(request)
            insert_edit(book, handle.ops, keys, values, request.target_new, epsilon=self.settings.epsilon,
                        same_key=self.settings.same_key)
            handle.inserted.append((keys, values, request.target_new))
        book.changed()
        self.last_stats = {"layer": book.layer, "n_entries": len(book.entries), "n_requests": len(requests)}
        return handle


def insert_entry(book: Codebook, ops: list[tuple[Any, ...]], key: torch.Tensor, value: torch.Tensor, label: str, *,
                 epsilon: float, same_key: float) -> None:
    """Add one edit's (key, value) to ``book`` by GRACE's rules (module docstring), appending to ``ops`` what it
    did so a :class:`GraceHandle` can undo it. Deterministic: the same inserts in the same order give the same
    codebook (how :mod:`editors.adaptors` rebuilds a recorded adaptor). Call ``book.changed()`` afterwards."""
    radius = epsilon * float(key.norm())
    found = book.nearest(key)
    if found is not None:
        near, dist = found
        if dist <= same_key * float(near.key.norm()):
            ops.append(("value", near.id, near.value, near.label))
            near.value, near.label = value, label
            return
        if dist <= near.radius + radius:
            ops.append(("radius", near.id, near.radius))
            if near.label == label:
                near.radius = max(near.radius, dist)
                return
            near.radius, radius = min(near.radius, dist / 2), min(radius, dist / 2)
    entry = Entry(book.new_id(), key, value, radius, label)
    book.entries[entry.id] = entry
    ops.append(("add", entry))


def insert_edit(book: Codebook, ops: list[tuple[Any, ...]], keys: torch.Tensor, values: torch.Tensor, label: str, *,
                epsilon: float, same_key: float) -> None:
    """:func:`insert_entry` for each row of one edit's ``keys`` (k, d_in) and ``values`` (k, d_out), in order (the
    plain prompt's entry, then the chat-framed one's): how an apply and a store replay insert an edit."""
    for key, value in zip(keys, values):
        insert_entry(book, ops, key, value, label, epsilon=epsilon, same_key=same_key)
