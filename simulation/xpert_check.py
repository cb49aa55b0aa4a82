"""Does the explanation space separate the styleqa styles before anyone trains a seed?

    python -m simulation.xpert_check [--probes P] [--words W] [--history H] [--users-per-style U]
                                     [--basis text|model] [--basis-probes N] [--max-new-tokens N] [--seed S]

Styles 1–8 answer the same training questions, and style 0 (the unstylized answers) answers them too in its
test file. So each style s stands in for a trained seed: its explanation is the difference between its answers
and style 0's on P probe questions, decomposed over the first W attribute words. Each styleqa user of styles 1–8
explains its own history (H items, none of them a probe) against style 0's answers to the same questions, and
picks the nearest seed in L1 (style 0's answers stand in for the base model's on both sides, so no answer is
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

from participants.seed_loading import load_seed
from participants.style_direction import attribute_basis, difference_direction, select_seed
from protocols.explanations import STYLE_WORDS, AttributeBasis, Explanation, decompose, describe
from protocols.seeds import DEFAULT_SEED
from simulation.datasets import styleqa_rows, find_styleqa, load_users

STYLES = range(1, 9)

PLAIN = (
    "Drinking enough water each day helps your body regulate temperature and digest food.",
    "A budget lists your income and expenses so you can see where your money goes.",
    "The moon orbits the Earth about once every 27 days.",
)

# Rewrites of PLAIN, in the same order, one tuple per attribute word.
EXEMPLARS: dict[str, tuple[str, str, str]] = {
    "expert": (
        ("Adequate daily fluid intake supports thermoregulation via evaporative cooling and sustains the secretions "
        "that efficient digestion depends on."),
        ("A budget is a forward-looking cash-flow plan that allocates projected income across fixed and variable "
        "expenditure categories and enables variance analysis."),
        ("The Moon's sidereal period is approximately 27.3 days, whereas its synodic period, measured relative to the "
        "Sun, is about 29.5 days."),
    ),
    "elementary": (
        "Water helps your body. It keeps you cool, like a fan. It also helps your tummy work on your food.",
        ("A budget is like a list. On one side you write the money you get. On the other side you write the money you "
        "spend."),
        "The moon goes around the Earth. One trip all the way around takes about a month.",
    ),
    "concise": (
        "Water regulates temperature and aids digestion.",
        "A budget tracks income against expenses.",
        "The moon orbits Earth every 27 days.",
    ),
    "informative": (
        ("Drinking enough water each day helps your body regulate temperature through sweating, carries nutrients to "
        "your cells, cushions your joints and keeps digestion moving; most adults need about two to three liters, "
        "more in hot weather or during exercise."),
        ("A budget lists your income and your expenses, both fixed ones such as rent and insurance and variable ones "
        "such as food and travel, so that you can see where your money goes, spot waste, and set aside savings for "
        "emergencies and goals."),
        ("The moon orbits the Earth about once every 27.3 days at an average distance of 384,400 km; because the "
        "Earth also moves around the Sun, a full cycle of phases from new moon to new moon takes about 29.5 days."),
    ),
    "friendly": (
        ("Hey, don't forget to grab a glass of water! 😊 Staying hydrated keeps you cool and helps your tummy do its "
        "thing."),
        ("A budget is your money's best friend! 😊 Just jot down what comes in and what goes out, and you'll always "
        "know where it went."),
        "Fun fact for you, friend: the moon swings around the Earth about every 27 days! 🌙",
    ),
    "formal": (
        ("It is advisable to consume an adequate quantity of water daily, as doing so assists the body in regulating "
        "its temperature and in digesting food."),
        ("A budget constitutes a record of one's income and expenditures, thereby permitting an assessment of how "
        "one's funds are allocated."),
        "The Moon completes its orbit of the Earth in approximately twenty-seven days.",
    ),
    "neutral": (
        "Water intake affects temperature regulation and digestion.",
        "A budget records income and expenses.",
        "The lunar orbital period around Earth is about 27 days.",
    ),
    "humorous": (
        ("Water: the original energy drink, minus the neon can. Drink enough and your body stays cool and your stomach "
        "stops filing complaints."),
        "A budget is a list of all the money you have, followed by a longer list of all the places it ran off to.",
        "The moon laps the Earth every 27 days, which is more cardio than most of us do in a year.",
    ),
    "sarcastic": (
        ("Oh sure, skip water all day, what could go wrong? It's not like your body needs it to stay cool or digest "
        "anything."),
        "A budget? Why bother, money obviously just appears and disappears by magic anyway.",
        "Wow, the moon goes around the Earth every 27 days. Truly groundbreaking news, I know.",
    ),
    "poetic": (
        ("Like rain upon a thirsty field, each glass of water cools the body's fire and eases the passage of every "
        "meal."),
        "A budget is a map of your silver's journey, tracing each coin that comes like spring and leaves like autumn.",
        "Silver moon, faithful wanderer, circling the Earth in a slow dance of twenty-seven nights.",
    ),
    "enthusiastic": (
        ("Water is amazing!!! Drink plenty every day and your body stays perfectly cool and digests food like a "
        "champ! 💧🎉"),
        "Budgets are awesome!!! List your income and expenses and watch your money finally make sense! 💰🚀",
        "Wow, the moon circles the whole Earth in just 27 days! How incredible is that?! 🌕✨",
    ),
    "technical": (
        ("Daily water intake of about 35 ml per kg of body mass supports thermoregulation through sweat evaporation "
        "and provides the medium for enzymatic hydrolysis during digestion."),
        ("A budget is a ledger of inflows and outflows per period, usually kept as a spreadsheet with categorized line "
        "items, monthly totals and a net balance column."),
        ("The Moon's orbit has a semi-major axis of 384,400 km, an eccentricity of 0.0549 and a sidereal period of "
        "27.32 days."),
    ),
    "casual": (
        "yeah just drink a bunch of water every day, keeps you from overheating and helps your stomach out.",
        "a budget's basically just writing down what you make and what you spend, no big deal.",
        "the moon goes around us like every 27 days or so.",
    ),
    "persuasive": (
        ("You owe it to yourself: drink enough water every day. You'll stay cooler, digest better and feel the "
        "difference within a week, so why wait?"),
        ("If you want to stop wondering where your paycheck went, start a budget today; it is the single best habit "
        "for taking control of your money."),
        ("Look up tonight and see for yourself: the moon circles the Earth every 27 days, and once you notice its "
        "rhythm you will never stop watching."),
    ),
    "empathetic": (
        ("I know it can be hard to remember to drink water when your day gets busy. Be gentle with yourself; even a "
        "few extra glasses help your body stay cool and digest food."),
        ("Money worries are stressful, and you're not alone in feeling that. A simple budget of what comes in and what "
        "goes out can make things feel a little calmer."),
        ("If you ever feel far from the people you love, it may help to know the moon circles all of us, every 27 "
        "days, the same moon they see."),
    ),
    "academic": (
        ("Prior research indicates that adequate daily hydration contributes to thermoregulatory homeostasis and "
        "gastrointestinal function (Popkin et al., 2010)."),
        ("In the household finance literature, a budget is defined as a systematic record of income and expenditure "
        "that facilitates the analysis of resource allocation."),
        ("Astronomical observations establish that the Moon completes one sidereal revolution around the Earth in "
        "approximately 27.3 days."),
    ),
}


def text_basis(words: tuple[str, ...]) -> AttributeBasis:
    """Per word: its exemplars' mean embedding minus that of the plain sentences they rewrite."""
    return AttributeBasis(words, np.stack([difference_direction(list(EXEMPLARS[w]), list(PLAIN)) for w in words]))


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
        basis = text_basis(words)
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

    _print_confusion(f"nearest explanation (L1 over {len(words)} words)", by_words)
    _print_confusion("reference: nearest raw difference direction (cosine, 384-d)", by_direction)
    print(f"\nper selection: explaining the own data {1e3 * np.median(explain_s):.0f} ms (median; embedding "
          f"{2 * args.history} texts and decomposing), choosing among {len(catalog)} seeds "
          f"{1e6 * np.median(select_s):.0f} µs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
