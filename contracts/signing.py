"""Ed25519 signatures of engine manifests.

The trainer signs the exact bytes of `manifest.json` and writes the detached signature as `manifest.sig`
beside it, before the rename that publishes the engine (the manifest is the commit point, and it lists the
sha256 of every other file, so one signature covers the whole engine). A server given trusted public keys
checks the signature before it parses the manifest; with `require_signature` an unsigned engine is refused.

Key files: a private key is raw 32 bytes or PEM (PKCS#8, unencrypted) and is refused when its group or
others may read it; a public key file holds one or more keys, as PEM blocks or one 64-hex-digit key a line
(several keys: a rotation, every listed key is trusted).
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SIGNATURE_SIZE = 64
_PEM_BLOCK = re.compile(rb"-----BEGIN PUBLIC KEY-----.+?-----END PUBLIC KEY-----", re.S)


class KeyFileError(ValueError):
    """A key file that cannot be used: unreadable, wrong format or too widely readable."""


def load_private_key(path: Path) -> Ed25519PrivateKey:
    path = Path(path)
    try:
        st = path.stat()
        raw = path.read_bytes()
    except OSError as e:
        raise KeyFileError(f"signing key {path}: {e}") from e
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"signing key {path} is readable by group or others (mode {stat.S_IMODE(st.st_mode):o}); "
                           f"chmod 600 {path}")
    if len(raw) == 32:
        return Ed25519PrivateKey.from_private_bytes(raw)
    try:
        key = serialization.load_pem_private_key(raw, password=None)
    except (ValueError, TypeError) as e:
        raise KeyFileError(f"signing key {path}: not a raw 32-byte or PEM Ed25519 private key ({e})") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"signing key {path}: a {type(key).__name__}, not an Ed25519 key")
    return key


def load_public_keys(path: Path) -> tuple[Ed25519PublicKey, ...]:
    """Every key in the file (PEM blocks, or one 64-hex-digit raw key a line); KeyFileError when none."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise KeyFileError(f"trusted keys {path}: {e}") from e
    keys: list[Ed25519PublicKey] = []
    try:
        for block in _PEM_BLOCK.findall(raw):
            key = serialization.load_pem_public_key(block)
            if not isinstance(key, Ed25519PublicKey):
                raise KeyFileError(f"trusted keys {path}: a {type(key).__name__}, not an Ed25519 key")
            keys.append(key)
        rest = _PEM_BLOCK.sub(b"", raw)
        for line in rest.decode("ascii").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                keys.append(Ed25519PublicKey.from_public_bytes(bytes.fromhex(line)))
    except (ValueError, UnicodeDecodeError) as e:
        raise KeyFileError(f"trusted keys {path}: not PEM Ed25519 public keys or 64-hex-digit lines ({e})") from e
    if not keys:
        raise KeyFileError(f"trusted keys {path}: no key in the file")
    return tuple(keys)


def public_key_hex(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


@dataclass(frozen=True, slots=True)
class ManifestTrust:
    """What a reader of the registry trusts: these keys; `required`: an unsigned engine is refused."""
    keys: tuple[Ed25519PublicKey, ...] = ()
    required: bool = False

    def __post_init__(self) -> None:
        if self.required and not self.keys:
            raise ValueError("require_signature needs at least one trusted public key")

    @classmethod
    def from_files(cls, trusted_keys: Path | None, required: bool) -> "ManifestTrust":
        return cls(load_public_keys(trusted_keys) if trusted_keys else (), required)

    @classmethod
    def of_signer(cls, key: Ed25519PrivateKey) -> "ManifestTrust":
        """Trust exactly what this signer signs, and nothing unsigned (a trainer reading its own engines)."""
        return cls((key.public_key(),), True)

    def check(self, manifest_bytes: bytes, signature: bytes | None) -> str | None:
        """None when acceptable, else why not. A signature present but not verifying is refused even when
        signatures are optional: it is a tampered or foreign engine, not an unsigned one."""
        if signature is None:
            return "no manifest signature (manifest.sig) and signatures are required" if self.required else None
        if not self.keys:
            return None  # nothing to check against: signatures are not in use here
        if len(signature) != SIGNATURE_SIZE:
            return f"manifest signature is {len(signature)} bytes, not {SIGNATURE_SIZE}"
        for key in self.keys:
            try:
                key.verify(signature, manifest_bytes)
                return None
            except InvalidSignature:
                continue
        return "manifest signature does not verify with any trusted key"


def sign(key: Ed25519PrivateKey, data: bytes) -> bytes:
    return key.sign(data)


def generate_keypair(private_path: Path, public_path: Path) -> str:
    """Write a new PEM private key (mode 600, never overwriting) and its PEM public key; returns the public
    key as hex."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub = key.public_key()
    Path(public_path).write_bytes(pub.public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo))
    return public_key_hex(pub)
