"""Style fidelity: does a generated answer read like the target user's own answers?

A logistic-regression classifier over MiniLM embeddings of history answers tells users (or style
classes) apart; a target's fidelity is the fraction of its generations that the classifier assigns
to the target's label. The classifier is trained on history items only, never on anyone's held-out
test items, so it cannot have memorised the answers it is meant to recognise.

Generations are short (a token budget) while history answers can be long, and a short text reads as
"concise" whatever its style; so the judge can clip the history answers to the same budget before it
learns from them (`clip`), comparing like with like.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from simulation.styleqa import style_label
from simulation.user_data import UserData


def training_set(users: Sequence[UserData], target: str,
                 label_of: Callable[[str], str] = style_label) -> tuple[list[str], list[str]]:
    """History answers and labels the classifier for `target` learns from.

    When other users carry the target's label (style classes), the target's own history is left out,
    so fidelity measures the style, not the person. When labels are per user, the target's history
    is the only source of its label and stays in. Test items are never read.
    """
    mine = label_of(target)
    others_share = any(label_of(u.user) == mine for u in users if u.user != target)
    texts, labels = [], []
    for u in users:
        if u.user == target and others_share:
            continue
        texts.extend(r.output for r in u.history)
        labels.extend(label_of(u.user) for _ in u.history)
    if len(set(labels)) < 2:
        raise ValueError(f"the fidelity classifier for {target!r} needs at least two labels among the users' "
                         f"histories, found {sorted(set(labels))}")
    if mine not in labels:
        raise ValueError(f"no history carries {target!r}'s label {mine!r}: fidelity cannot be measured")
    return texts, labels


class FidelityJudge:
    """One classifier per target (cached), over embeddings of every user's history computed once.

    `version` names how it judges; stored results scored by another version are re-scored.
    """

    version = "minilm-logreg-balanced-clipped"

    def __init__(self, users: Sequence[UserData], label_of: Callable[[str], str] = style_label,
                 clip: Callable[[str], str] | None = None):
        from participants.profile import embed_texts

        self.users, self.label_of, self._embed = list(users), label_of, embed_texts
        self._clip = clip or (lambda text: text)
        texts = sorted({r.output for u in self.users for r in u.history})
        self._vectors = dict(zip(texts, self._embed([self._clip(t) for t in texts])))
        self._classifiers: dict[str, object] = {}

    def _classifier(self, target: str):
        from sklearn.linear_model import LogisticRegression

        if target not in self._classifiers:
            texts, labels = training_set(self.users, target, self.label_of)
            X = np.stack([self._vectors[t] for t in texts])
            self._classifiers[target] = LogisticRegression(max_iter=2000, class_weight="balanced").fit(X, labels)
        return self._classifiers[target]

    def fidelity(self, target: str, generations: Sequence[str]) -> float:
        """Fraction of the generations classified as the target's label."""
        if not generations:
            raise ValueError(f"no generations to judge for {target!r}")
        predicted = self._classifier(target).predict(self._embed(list(generations)))
        return float(np.mean(predicted == self.label_of(target)))
