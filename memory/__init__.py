"""The edit store: versioned SQL records with a FAISS index over their embeddings."""

from memory.errors import EditmemError, FormatError, NotFoundError, StoreError, ValidationError
from memory.records import EditCase, EditRecord, Hit, Probe

__all__ = [
    "EditCase",
    "EditMemory",
    "EditRecord",
    "EditmemError",
    "FormatError",
    "Hit",
    "NotFoundError",
    "Probe",
    "StoreError",
    "ValidationError",
]


def __getattr__(name: str):  # EditMemory pulls in SQLAlchemy and FAISS: import it only when asked for
    if name == "EditMemory":
        from memory.store import EditMemory

        return EditMemory
    raise AttributeError(name)
