"""`bouquet bench`: Per-Pcs against its baselines on the same users (run.py), one idea per module:
settings (and presets), users (who is benched), sharers, methods, seeds (with a catalog), sweeps, results
(the resumable store), report, plots."""
