"""`bouquet seeds bench`: XPerT's seed choice against trying the seeds, on styleqa users of a built catalog.

    bouquet seeds bench --catalog runs/catalog [--out runs/seeds-bench] [--users-per-style 2] [--history 16]

Four comparisons, each printed and written to <out>/report.json and report.md (report), with figures beside
it (plots):
  1. accuracy: users of style s should pick the seed built for s; XPerT (explanations only), exhaustive search
     and successive halving (both score the seeds' loss on the user's history), with confusion matrices;
  2. scaling: cost against catalog size (4, 8, 16, 32 seeds of the tiny model): XPerT's selection stays flat,
     the searches grow with the catalog;
  3. tuning: never from scratch: a LoRA fine-tuned from the selected seed against one from the base, held-out
     loss along the steps: how many steps (and seconds) the selected seed needs to reach the base's best loss;
  4. pools: the adapter a newcomer assembles from its seed's pool (pieces that sharers trained on that seed)
     against the one assembled from the base's pool (the same sharers, trained on the base).

Users are slices of each style's styleqa training rows taken from the end, so they never overlap the rows the
seeds were built from (the start of the file) nor the probe questions (test questions) (users).

Rerunning into the same --out resumes (run). Against a catalog that changed since (seeds rebuilt or
re-explained), everything that depends on it is done again, and only that (state): a user's own style direction
depends on the base and the answer length, so XPerT chooses again from it without generating; the searches run
again; fine-tuning from the base is kept and from the chosen seed redone where the choice or its weights
changed; the pools are filled again.
"""

from simulation.seeds_bench.run import PARTS, run_seed_bench
from simulation.seeds_bench.settings import SeedBenchSettings

__all__ = ["PARTS", "SeedBenchSettings", "run_seed_bench"]
