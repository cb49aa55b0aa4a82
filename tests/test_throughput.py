import json

import pytest

from simulation.throughput import main


def test_throughput_benchmark_measures_every_part(tmp_path, tiny_seed):
    out = tmp_path / "throughput.json"
    assert main(["--seed-model", "tiny-random", "--steps", "3", "--repeats", "1", "--dp-steps", "2", "--dp-batch", "8",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["seed"] == "tiny-random" and result["settings"]["steps"] == 3
    assert set(result["parts"]) == {"lora_training", "assembly", "shortlist", "dp_sgd"}
    for part in result["parts"].values():
        ours, bare = part["bouquet_tokens_per_s"], part["bare_tokens_per_s"]
        assert ours > 0 and bare > 0
        assert part["ratio"] == pytest.approx(ours / bare, rel=1e-12)
        assert len(part["bouquet_runs"]) == len(part["bare_runs"]) == 1
    assert all(m["max_rss_mib"] > 0 for m in result["memory"].values())
    # the bare loop unloaded its LoRA: the cached seed has no adapter layers left
    assert not any("lora_" in name for name, _ in tiny_seed.model.named_modules())
