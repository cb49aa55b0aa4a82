"""Hand-written exemplars of each style word: a basis for explanations that costs no generation.

Per attribute word, rewrites of the same few plain sentences in that style. The difference between the
rewrites' mean embedding and the plain sentences' is the word's direction (`text_basis`), the same kind of
difference that explains a seed (its answers against the base's) and a participant (its answers against the
base's), so all three are written in one basis. The embedder is passed in, so this module stays model-free and
both sides compute the basis identically.
"""

from __future__ import annotations

import numpy as np

from protocols.explanations import AttributeBasis, Embed, difference_direction

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


def check_exemplars(words) -> None:
    missing = [w for w in words if w not in EXEMPLARS]
    if missing:
        raise ValueError(f"no hand-written exemplars for {', '.join(map(repr, missing))}; the text basis knows "
                         f"{', '.join(EXEMPLARS)} (use the model basis for other words)")


def text_basis(words: tuple[str, ...] | list[str], embed: Embed) -> AttributeBasis:
    """Per word: its exemplars' mean embedding minus that of the plain sentences they rewrite."""
    check_exemplars(words)
    return AttributeBasis(tuple(words), np.stack([difference_direction(list(EXEMPLARS[w]), list(PLAIN), embed)
                                                  for w in words]))
