"""Who is benched: disjoint sharers and targets, drawn from a data set with the run's random seed."""

from __future__ import annotations

import math
import random

from simulation.bench.settings import BenchSettings
from simulation.datasets import load_users
from simulation.settings import is_styleqa
from simulation.styleqa import STYLEQA_STYLES, style_label
from simulation.user_data import UserData


def split_users(s: BenchSettings) -> tuple[list[UserData], list[UserData]]:
    """Disjoint sharers and targets. For styleqa they are spread over the styles in the same (shuffled) style
    order, so that targets find sharers of their own style."""
    rng = random.Random(s.rng_seed)
    if is_styleqa(s.data):
        per_sharer, per_target = math.ceil(s.sharers / len(STYLEQA_STYLES)), math.ceil(s.targets / len(STYLEQA_STYLES))
        users = load_users(s.data, history_size=s.history, test_size=s.test, seed=s.rng_seed,
                           styleqa_users_per_style=per_sharer + per_target)
        by_style: dict[str, list[UserData]] = {}
        for u in users:
            by_style.setdefault(style_label(u.user), []).append(u)
        styles = sorted(by_style)
        rng.shuffle(styles)
        sharers = [by_style[st][j] for j in range(per_sharer) for st in styles][: s.sharers]
        targets = [by_style[st][per_sharer + j] for j in range(per_target) for st in styles][: s.targets]
        return sharers, targets
    users = load_users(s.data, history_size=s.history, test_size=s.test, seed=s.rng_seed)
    if len(users) < s.sharers + s.targets:
        raise ValueError(f"{s.data} gives {len(users)} users with {s.history}+{s.test} items, but {s.sharers} "
                         f"sharers + {s.targets} targets need {s.sharers + s.targets}: lower --sharers/--targets "
                         f"or --history/--test")
    chosen = rng.sample(users, s.sharers + s.targets)
    return chosen[: s.sharers], chosen[s.sharers:]


def fold_users(s: BenchSettings) -> list[UserData]:
    """The --targets users of a rotating-folds run, in the order their folds take sharers from. For styleqa the
    styles alternate (every style's first user, then every style's second, ...), so that the next users of a
    fold cover the styles evenly."""
    rng = random.Random(s.rng_seed)
    if is_styleqa(s.data):
        per_style = math.ceil(s.targets / len(STYLEQA_STYLES))
        users = load_users(s.data, history_size=s.history, test_size=s.test, seed=s.rng_seed,
                           styleqa_users_per_style=per_style)
        by_style: dict[str, list[UserData]] = {}
        for u in users:
            by_style.setdefault(style_label(u.user), []).append(u)
        styles = sorted(by_style)
        rng.shuffle(styles)
        order = [by_style[st][j] for j in range(per_style) for st in styles if j < len(by_style[st])]
    else:
        order = load_users(s.data, history_size=s.history, test_size=s.test, seed=s.rng_seed)
        rng.shuffle(order)
    if len(order) < s.targets:
        raise ValueError(f"{s.data} gives {len(order)} users with {s.history}+{s.test} items, but --rotate with "
                         f"{s.targets} targets needs {s.targets}: lower --targets or --history/--test")
    return order[: s.targets]


def fold_sharers(users: list[UserData], index: int, n: int) -> list[UserData]:
    """The sharers of user `index`'s fold: the `n` users after it, cyclically (never itself)."""
    if not 1 <= n < len(users):
        raise ValueError(f"a fold needs 1 to {len(users) - 1} sharers, got {n}")
    return [users[(index + j) % len(users)] for j in range(1, n + 1)]
