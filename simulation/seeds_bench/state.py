"""What the bench's kept results are valid for: the catalog they were measured on, as one fingerprint."""

from __future__ import annotations

import hashlib
import json

from protocols.catalog import Catalog


def catalog_fingerprint(catalog: Catalog) -> str:
    """What the bench's results depend on in a catalog: its seeds' weights, their explanations and the basis."""
    return hashlib.sha256(json.dumps(catalog.to_dict(), sort_keys=True).encode()).hexdigest()
