"""``ft_m``: FT-M, KnowEdit's fine-tuning baseline with the loss on the target tokens only (Zhang et al. 2024).

The same machinery as :mod:`editors.methods.ft` (one MLP output projection trained with Adam through
:func:`torch.func.functional_call`, compute then apply, :class:`~editors.base.WeightEditHandle`), with EasyEdit's
FT-M hyper-parameters (``hparams/FT/llama-7b.yaml`` with ``objective_optimization: target_new``): the prompt is
masked out of the loss (``objective="target_new"``) and there is **no** norm constraint (``norm_constraint=None``);
lr 5e-4, 25 steps, as ``ft``. The layer is ``ft``'s default (``num_layers // 3``); EasyEdit edits layer 21 of 32 on
Llama-2-7b, which is a setting away (``layer=...``).

``ft`` itself keeps ROME's constrained FT-L settings (norm constraint 5e-4); ``ft`` with ``objective="prompt_last"``
and ``norm_constraint=None`` is EasyEdit's FT-L row of the KnowEdit table.
"""

from __future__ import annotations

import torch

from editors.base import register_editor
from editors.methods.ft import FTEditor, FTSettings, ft_default_layer


@register_editor
class FTMEditor(FTEditor):
    """Fine-tuning with the loss on the target tokens only and no norm constraint (FT-M)."""

    name = "ft_m"

    @classmethod
    def default_settings(cls, model: torch.nn.Module) -> FTSettings:
        return FTSettings(layer=ft_default_layer(model), objective="target_new", norm_constraint=None)
