"""``mend``: edits made by a trained gradient hypernetwork (MEND, Mitchell et al. 2022), in five parts:
:mod:`.network` (the hypernetwork), :mod:`.factors` (gradient factors from hooked model passes), :mod:`.training`
(settings, losses, the training loop), :mod:`.checkpoint` (save/load, fingerprint-checked) and :mod:`.editor` (the
registered editor)."""

from editors.methods.mend.checkpoint import (
                                             LoadedMEND,
                                             MendCheckpointError,
                                             checkpoint_folder,
                                             load_checkpoint,
                                             save_checkpoint,
)
from editors.methods.mend.editor import MENDEditor, MENDSettings
from editors.methods.mend.factors import (
                                             FrozenModel,
                                             edit_hooks,
                                             encode_rows,
                                             transform_factors,
                                             weight_deltas,
)
from editors.methods.mend.network import MENDNet
from editors.methods.mend.training import (
                                             MENDTrainSettings,
                                             TrainResult,
                                             edit_layers,
                                             new_network,
                                             train_mend,
)

__all__ = [
    "FrozenModel", "LoadedMEND", "MENDEditor", "MENDNet", "MENDSettings", "MENDTrainSettings", "MendCheckpointError",
    "TrainResult", "checkpoint_folder", "edit_hooks", "edit_layers", "encode_rows", "load_checkpoint", "new_network",
    "save_checkpoint", "train_mend", "transform_factors", "weight_deltas",
]
