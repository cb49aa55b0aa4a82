"""The bench's sharers: each runs the device's own sharer pipeline once; its full adapter stays in its folder.

A simulated device's signing key and share draw derive from the run's random seed, so piece ids and pools
repeat from run to run (a real device's key comes from the OS's randomness).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.pool import PiecePool
from participants.progress import log, progress
from participants.seed_loading import LoadedSeed
from participants.sharing import train_and_share
from protocols.files import write_json
from protocols.pieces import Piece
from protocols.settings import ParticipantSettings
from simulation.user_data import UserData, folder_name


def sharer_key(s: ParticipantSettings, user: str) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(f"bench:{s.rng_seed}:{user}".encode()).digest())


def share_seed(s: ParticipantSettings, sharer_index: int) -> int:
    return s.rng_seed * 7919 + sharer_index


def prepare_sharers(seed: LoadedSeed, s: ParticipantSettings, sharers: list[UserData], out: Path,
                    pool: PiecePool | None, share_ratio: float, dp=None) -> dict[str, dict]:
    """Train, cut and share every sharer not done yet (out/sharers.json keeps who is done, and their costs).

    `share_ratio` is what each sends (BenchSettings.sent_share_ratio: its policy's cap applied); without a pool
    nothing is sent and only the devices' folders are written (the privacy audit draws the shares itself). `dp`
    (participants.dp_sgd.DpSgd) trains by DP-SGD."""
    path = out / "sharers.json"
    stats: dict[str, dict] = json.loads(path.read_text()) if path.exists() else {}
    sent = replace(s, share_ratio=share_ratio)
    with progress(len(sharers), "sharers") as bar:
        for i, u in enumerate(sharers):
            if u.user not in stats:
                result = train_and_share(seed, u.history, sent, sharer_key(s, u.user), share_seed(s, i), who=u.user,
                                         dp=dp)
                device = out / "devices" / folder_name(u.user)
                device.mkdir(parents=True, exist_ok=True)
                for p in result.pieces:
                    (device / f"{p.piece_id}.safetensors").write_bytes(p.to_bytes())
                _, refused = pool.add_many(result.shared) if pool is not None else ([], [])
                for r in refused:
                    log.warning("%s: %s", u.user, r)
                m = result.metrics()
                stats[u.user] = {
                    "upload_bytes": m["upload-bytes"], "train_seconds": result.lora.seconds + result.gates.seconds,
                    "train_tokens": result.lora.tokens + result.gates.tokens, "lora_seconds": result.lora.seconds,
                    "lora_tokens": result.lora.tokens,
                    "gate_seconds": result.gates.seconds, "lora_loss_first": m["lora-loss-first"],
                    "lora_loss_last": m["lora-loss-last"], "pieces_cut": len(result.pieces),
                    "pieces_shared": len(result.shared), "pieces_refused": len(refused), "epsilon": result.epsilon}
                write_json(path, stats)
            bar.update(sharer=u.user)
    return stats


def device_pieces(out: Path, user: str) -> list[Piece]:
    """A sharer's full adapter as pieces, read back from its device folder, in position order."""
    folder = out / "devices" / folder_name(user)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no pieces; remove {user} from sharers.json to retrain")
    return sorted((Piece.from_bytes(f.read_bytes()) for f in files), key=lambda p: p.position)
