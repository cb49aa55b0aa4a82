"""Building the seed catalog (XPerT), the coordinator operator's work: seeds made from labeled data or from
the pool, each with its explanation, so that a device can pick the nearest seed from catalog.json alone.

    build_catalog_from_labels   one seed per group of records: a LoRA trained from the base on them (labeled)
    build_catalog_from_pool     one seed per cluster of pool contributors: the exact mean of their LoRA
                                updates (from_pool, with coordinator.pool_merging)
    ExplainSettings             how the seeds are explained; changing it only re-explains them (settings)
    explain_catalog             the explanations of seeds whose probe answers are stored (explaining)
    read_as_another_label       labeled seeds whose explanation reads as another seed's label (retraining)

Either way a seed is stored as base + delta (protocols.seeds) and explained by how its answers to the probe
prompts differ from the base's, in attribute words. A build is resumable, and refuses to mix seeds built two
ways in one folder (state). The layout of a build folder is in `layout`.

A room of its own because it needs both a device's trainer and generator (participants) and the coordinator's
explainer and pool (coordinator), which never import each other. It knows no data set: the harness
(simulation.styleqa, the command line) hands it groups of records and probe prompts.
"""

from catalog_build.explaining import explain_catalog
from catalog_build.from_pool import build_catalog_from_pool
from catalog_build.labeled import build_catalog_from_labels
from catalog_build.layout import ANSWERS_FILE
from catalog_build.retraining import read_as_another_label
from catalog_build.settings import ExplainSettings

__all__ = ["ANSWERS_FILE", "ExplainSettings", "build_catalog_from_labels", "build_catalog_from_pool", "explain_catalog",
           "read_as_another_label"]
