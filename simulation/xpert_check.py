"""Does the explanation space separate the styleqa styles before anyone trains a seed?

    python -m simulation.xpert_check [--probes P] [--words W] [--history H] [--users-per-style U]
                                     [--basis text|model] [--basis-probes N] [--max-new-tokens N] [--seed S]

Styles 1–8 answer the same training questions, and style 0 (the unstylized answers) answers them too in its
test file. So each style s stands in for a trained seed: its explanation is the difference between its answers
and style 0's on P probe questions, decomposed over the first W attribute words. Each styleqa user of styles 1–8
explains its own history (H items, none of them a probe) against style 0's answers to the same questions, and
picks the seed with the nearest mix of attributes (style 0's answers stand in for the base model's on both sides, so no answer is
generated for users or seeds). Printed: the seeds' explanations, the confusion matrix, the accuracy, the same for
the nearest raw difference direction (cosine, 384-d: the same data without the words), and the time per
selection.

The attribute basis comes from the real base model (`--basis model`: SmolLM2 answers probes told "Answer in a
w style." vs. plainly) or, at no generation cost, from hand-written exemplars (`--basis text`): per word,
rewrites of a few plain sentences in that style against the plain sentences.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from participants.profile import embed_texts
from participants.seed_loading import load_seed
from participants.style_direction import attribute_basis, difference_direction, select_seed
from protocols.attribute_words import PLAIN, text_basis
from protocols.explanations import STYLE_WORDS, Explanation, decompose, describe
from protocols.seeds import DEFAULT_SEED
from simulation.datasets import styleqa_rows, find_styleqa, load_users

STYLES = range(1, 9)

def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _print_confusion(title: str, confusion: np.ndarray) -> None:
    print(f"\n{title}  (rows: the user's style, columns: the chosen seed)")
    print("        " + "".join(f"{f's{s}':>5}" for s in STYLES))
    for s, row in zip(STYLES, confusion):
        print(f"  s{s}    " + "".join(f"{n:>5d}" for n in row))
    print(f"  accuracy {np.trace(confusion) / confusion.sum():.3f} ({np.trace(confusion)}/{confusion.sum()})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simulation.xpert_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--probes", type=int, default=8, help="probe questions per seed explanation")
    p.add_argument("--words", type=int, default=8, help=f"the first W of {', '.join(STYLE_WORDS)}")
    p.add_argument("--history", type=int, default=16, help="history items per user")
    p.add_argument("--users-per-style", type=int, default=2)
    p.add_argument("--basis", choices=("text", "model"), default="text")
    p.add_argument("--basis-probes", type=int, default=None, help="the first N probes for --basis model "
                   "(default: all; each costs W + 1 generations)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="answer length for --basis model")
    p.add_argument("--seed", type=int, default=0, help="which styleqa rows the users get")
    args = p.parse_args(argv)
    if not 1 <= args.words <= len(STYLE_WORDS):
        p.error(f"--words must be between 1 and {len(STYLE_WORDS)}")
    words = STYLE_WORDS[: args.words]

    users = [u for u in load_users("styleqa", history_size=args.history, test_size=1, seed=args.seed,
                                   styleqa_users_per_style=args.users_per_style) if not u.user.startswith("style0-")]
    folder = find_styleqa()
    unstylized = {r.input: r.output for split in ("train", "test") for r in styleqa_rows(folder, 0, split)}
    seeds = {s: styleqa_rows(folder, s, "train") for s in STYLES}
    used = {r.input for u in users for r in u.history}
    probe_rows = [i for i, r in enumerate(seeds[1]) if r.input not in used][: args.probes]
    probes = [seeds[1][i].input for i in probe_rows]
    print(f"{len(users)} users (styles 1–8, {args.history} history items each), {len(probes)} probes, "
          f"words: {', '.join(words)}")

    start = time.perf_counter()
    if args.basis == "model":
        basis_probes = probes[: args.basis_probes]
        basis = attribute_basis(load_seed(DEFAULT_SEED), basis_probes, words, max_new_tokens=args.max_new_tokens)
        source = f"{DEFAULT_SEED} on {len(basis_probes)} probes, {args.max_new_tokens} new tokens"
    else:
        basis = text_basis(words, embed_texts)
        source = f"hand-written exemplars, {len(PLAIN)} per word"
    print(f"attribute basis from {source}: built in {time.perf_counter() - start:.1f} s")

    directions: dict[str, np.ndarray] = {}
    catalog: dict[str, Explanation] = {}
    for s in STYLES:
        rows = [seeds[s][i] for i in probe_rows]
        directions[f"style{s}"] = difference_direction([r.output for r in rows], [unstylized[r.input] for r in rows])
        catalog[f"style{s}"] = decompose(directions[f"style{s}"], basis)
        print(f"  style{s}: {describe(catalog[f'style{s}'])}")

    by_words = np.zeros((len(STYLES), len(STYLES)), dtype=int)
    by_direction = np.zeros_like(by_words)
    explain_s, select_s = [], []
    for user in users:
        truth = int(user.user.split("-")[0].removeprefix("style")) - 1
        start = time.perf_counter()
        direction = difference_direction([r.output for r in user.history], [unstylized[r.input] for r in user.history])
        own = decompose(direction, basis)
        middle = time.perf_counter()
        chosen = select_seed(own, catalog, words)
        select_s.append(time.perf_counter() - middle)
        explain_s.append(middle - start)
        by_words[truth, int(chosen.seed_id.removeprefix("style")) - 1] += 1
        nearest = max(directions, key=lambda seed_id: _cosine(direction, directions[seed_id]))
        by_direction[truth, int(nearest.removeprefix("style")) - 1] += 1

    _print_confusion(f"nearest explanation (mix L1 over {len(words)} words)", by_words)
    _print_confusion("reference: nearest raw difference direction (cosine, 384-d)", by_direction)
    print(f"\nper selection: explaining the own data {1e3 * np.median(explain_s):.0f} ms (median; embedding "
          f"{2 * args.history} texts and decomposing), choosing among {len(catalog)} seeds "
          f"{1e6 * np.median(select_s):.0f} µs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
