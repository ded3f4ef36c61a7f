"""Pair features for the trained scope head: what the classifier sees of a (query, edit) pair.

``u`` is the query's embedding, ``v`` the edit key's (the edit prompt's, as the store indexes it); both unit-norm from
the same encoder. The vector is ``[u*v, |u-v|, lexical]`` where ``lexical`` holds five scalars:

- ``cos``: u . v (the store's own similarity);
- ``has_subject``: 1 if the edit names a subject;
- ``subject_words``: share of the subject's words that occur in the query (0 without a subject);
- ``subject_exact``: 1 if the subject occurs in the query as a phrase (case-insensitive);
- ``jaccard``: word-set Jaccard similarity of query and edit prompt.

The raw ``u`` and ``v`` are left out on purpose: with them a head memorises the training edits' regions of the
embedding space instead of learning what makes a pair match, and scores held-out edits (even a query equal to the edit
prompt) low. The subject features carry what a sentence embedding blurs: "The mother tongue of Léon Blum is" and
"The mother tongue of Danielle Darrieux is" embed close together but concern different subjects.
:data:`FEATURE_SPEC` names this layout; a saved classifier records it and is refused by code that builds another.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch

FEATURE_SPEC = "u*v,|u-v|,cos,has_subject,subject_words,subject_exact,jaccard/v1"
N_LEXICAL = 5
_WORD = re.compile(r"\w+", re.UNICODE)


def n_features(dim: int) -> int:
    """Length of the feature vector for an encoder of dimension ``dim``."""
    return 2 * dim + N_LEXICAL


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def lexical(query: str, edit_prompt: str, subject: str | None) -> tuple[float, float, float, float]:
    """``(has_subject, subject_words, subject_exact, jaccard)`` of one pair (``cos`` comes from the vectors)."""
    q_words = _words(query)
    q_set = set(q_words)
    p_set = set(_words(edit_prompt))
    union = q_set | p_set
    jaccard = len(q_set & p_set) / len(union) if union else 0.0
    if not subject or not subject.strip():
        return 0.0, 0.0, 0.0, jaccard
    s_words = _words(subject)
    if not s_words:
        return 0.0, 0.0, 0.0, jaccard
    share = sum(w in q_set for w in s_words) / len(s_words)
    joined = " " + " ".join(q_words) + " "
    exact = float(" " + " ".join(s_words) + " " in joined)
    return 1.0, share, exact, jaccard


def names_subject(query: str, subject: str | None) -> bool:
    """Whether ``query`` names ``subject`` as a phrase (case-insensitive, word by word): ``subject_exact``."""
    return bool(lexical(query, "", subject)[2])


def lexical_many(queries: Sequence[str], prompts: Sequence[str], subjects: Sequence[str | None]) -> np.ndarray:
    """:func:`lexical` for many pairs, (n, 4) float32."""
    return np.asarray([lexical(q, p, s) for q, p, s in zip(queries, prompts, subjects)],
                      dtype=np.float32).reshape(-1, 4)


def pair_features(u: torch.Tensor, v: torch.Tensor, lex: torch.Tensor) -> torch.Tensor:
    """The feature matrix (n, 2*dim + 5) of n pairs: ``u``, ``v`` (n, dim) unit rows, ``lex`` (n, 4) from
    :func:`lexical_many`."""
    cos = (u * v).sum(-1, keepdim=True)
    return torch.cat([u * v, (u - v).abs(), cos, lex], dim=-1)
