"""Keyed tombstones: what the ledger and the registry keep of a deleted example.

Example ids are content hashes (or the user's own ids), so keeping a deleted id, or publishing it in a
registry tag, would let anyone holding a candidate text confirm that it was in the data and was
deleted. Instead every id is kept as HMAC-SHA256(secret, id), with a random secret per state folder
(`secret.key`, readable by the owner only): without the secret a tombstone reveals nothing, and the
state's owner can still answer "is this id deleted?" (`s3t status --id ID`).

The same key versions the data: a slice's version is HMAC(secret, its sorted live ids), not a plain hash of
them. A plain hash would undo the tombstones: anyone holding a slice's current members and a candidate text
could hash "members + that id" and find the version the slice had before the deletion (in the ledger, in a
registry tag, in a checkpoint name derived from it). Keyed, equal members still give equal versions inside a
state (checkpoints stay content-addressed), and nothing outside the state can recompute one.
"""
from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable
from pathlib import Path

from s3t_ops.files import write_atomic

SECRET_FILE = "secret.key"


class Keyring:
    def __init__(self, secret: bytes):
        if len(secret) < 16:
            raise ValueError("the tombstone secret must hold at least 16 bytes")
        self._secret = secret

    @classmethod
    def create(cls, state_dir: Path, secret: bytes | None = None) -> "Keyring":
        """A new random key (`secret`: a given one, e.g. for a second state that must share the first's keyspace)."""
        secret = os.urandom(32) if secret is None else secret

        def write(tmp: Path) -> None:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secret.hex() + "\n")

        write_atomic(Path(state_dir) / SECRET_FILE, write)
        return cls(secret)

    @classmethod
    def load(cls, state_dir: Path) -> "Keyring":
        path = Path(state_dir) / SECRET_FILE
        try:
            text = path.read_text().strip()
            return cls(bytes.fromhex(text))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} is missing: tombstones of deleted examples cannot be checked without it") from None
        except ValueError:
            raise ValueError(f"{path} is damaged (not a hex secret)") from None

    def tombstone(self, example_id: str) -> str:
        return hmac.new(self._secret, str(example_id).encode("utf-8"), hashlib.sha256).hexdigest()[:32]

    def tombstones(self, ids: Iterable[str]) -> list[str]:
        return [self.tombstone(i) for i in ids]

    def slice_version(self, member_ids: Iterable[str]) -> str:
        """Data version of a slice: keyed hash of its sorted live ids (content-addressing for checkpoints)."""
        h = hmac.new(self._secret, b"slice-version\n", hashlib.sha256)
        for i in sorted(member_ids):
            h.update(str(i).encode("utf-8"))
            h.update(b"\n")
        return h.hexdigest()[:16]

    def rekey(self, value: str, kind: str) -> str:
        """A keyed replacement for a value derived from plain ids (a slice version of an older state)."""
        return hmac.new(self._secret, f"{kind}|{value}".encode(), hashlib.sha256).hexdigest()[:16]
