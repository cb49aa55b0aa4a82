"""Data sets turned into virtual participants, the Flower simulation wiring, baselines and the benchmark."""
