"""`bouquet stream-bench`: a device learning from its stream (participants.stream_buffer): held-out perplexity and
ROUGE-1 against buffer size for each selection rule, with and without synthesis, against the whole stream; the
cost of scoring an item; the buffer's memory."""

from simulation.stream_bench.run import run_stream_bench
from simulation.stream_bench.settings import PRESETS, StreamBenchSettings, resolve_settings

__all__ = ["PRESETS", "StreamBenchSettings", "resolve_settings", "run_stream_bench"]
