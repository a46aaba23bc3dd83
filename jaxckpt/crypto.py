"""Encryption at rest: AES-GCM per chunk, the manifest sealed (docs/FORMAT.md §12).

* Keys: 16, 24 or 32 bytes (AES-128/192/256), or a zero-argument callable
  returning them (a KMS or secret manager, called when a save or restore
  starts). Never stored; the checkpoint records a *fingerprint*
  (HKDF-SHA256 of the key with a fixed label, 8 bytes, hex), which tells keys
  apart without revealing them.
* Data: each data file gets a random 16-byte salt and its own key,
  ``HKDF-SHA256(key, salt, "jaxckpt data v2")``; each checksum chunk is
  encrypted with AES-GCM under that key, nonce = 4 zero bytes + the chunk's
  8-byte index in the file (unique per key: a fresh key per file), associated
  data = the file name, the chunk's offset and length, so a chunk moved,
  swapped or copied from another file or checkpoint fails its tag. The
  ciphertext sits at the plaintext's offsets (same length); the 16-byte tags
  go into the sealed manifest.
* Manifest: the whole v1 manifest (key paths, shapes, metadata) plus each
  file's salt and tags, sealed with AES-GCM under ``HKDF(key, salt,
  "jaxckpt manifest v2")`` with a random nonce, inside a version-2 envelope
  that shows only the format, version, cipher, key fingerprint and sizes.
  An older reader refuses it ("format version 2 is not supported").

Uses the ``cryptography`` package (OpenSSL, AES-NI), imported on first use
(``pip install 'jaxckpt[encryption]'``). It holds the GIL while it encrypts,
so large chunks are done in 1 MiB pieces with a pause between them: a
training loop's Python never waits more than a piece (~0.3 ms here).
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import msgpack

from jaxckpt.errors import CorruptCheckpointError, DecryptionError, UnsupportedValueError

INSTALL = "pip install 'jaxckpt[encryption]'"
VERSION = 2
CIPHER = "AES-GCM/HKDF-SHA256"
KEY_LENGTHS = (16, 24, 32)
TAG = 16
PIECE = 1 << 20
MAX_SEALED = 64 << 20  # the sealed manifest: the v1 manifest's own cap, plus tags
_DATA_INFO, _MANIFEST_INFO, _FP_INFO = b"jaxckpt data v2", b"jaxckpt manifest v2", b"jaxckpt key fingerprint"

Key = bytes | Callable[[], bytes]


_LIB: Any = None


def _lib() -> Any:
    global _LIB
    if _LIB is not None:
        return _LIB
    try:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF
        from cryptography.exceptions import InvalidTag
    except ImportError:
        raise UnsupportedValueError(f"encrypted checkpoints need the cryptography package: {INSTALL}") from None
    _LIB = type("lib", (), dict(hashes=hashes, Cipher=Cipher, algorithms=algorithms, modes=modes, AESGCM=AESGCM,
                                HKDF=HKDF, InvalidTag=InvalidTag))
    return _LIB


def load() -> None:
    """Import the cipher library now (``UnsupportedValueError`` naming the install line if missing)."""
    _lib()


def resolve_key(key: Key | None) -> bytes | None:
    """The key bytes (calling a callable once); ``DecryptionError`` for a bad one."""
    if key is None:
        return None
    if callable(key):
        key = key()
    if isinstance(key, (bytearray, memoryview)):
        key = bytes(key)
    if not isinstance(key, bytes):
        raise DecryptionError(f"an encryption key is 16, 24 or 32 bytes, found {type(key).__name__}")
    if len(key) not in KEY_LENGTHS:
        raise DecryptionError(f"an encryption key is 16, 24 or 32 bytes (AES-128/192/256), found {len(key)} bytes")
    return key


def _derive(key: bytes, salt: bytes, info: bytes, n: int | None = None) -> bytes:
    lib = _lib()
    return lib.HKDF(algorithm=lib.hashes.SHA256(), length=n or len(key), salt=salt, info=info).derive(key)


def fingerprint(key: bytes) -> str:
    return _derive(key, b"", _FP_INFO, 8).hex()


def _aad_head(name: str) -> bytes:
    """The first bytes of a chunk's associated data in file ``name`` (FORMAT.md §12)."""
    return b"jaxckpt chunk\0" + name.encode() + b"\0"


def _aad(head: bytes, offset: int, length: int) -> bytes:
    return head + offset.to_bytes(8, "little") + length.to_bytes(8, "little")


def _nonce(index: int) -> bytes:
    return bytes(4) + index.to_bytes(8, "little")


def _pieces(ctx: Any, src: memoryview, dst: memoryview) -> None:
    """``ctx.update_into`` over ``src`` in pieces, letting other threads run between them."""
    for a in range(0, len(src), PIECE):
        ctx.update_into(src[a:a + PIECE], dst[a:a + PIECE])
        time.sleep(0)


class FileCipher:
    """The cipher of one data file: chunks encrypted and decrypted by index."""

    def __init__(self, key: bytes, name: str, salt: bytes | None = None):
        self.lib = _lib()
        self.name = name
        self.salt = os.urandom(16) if salt is None else salt
        self._key = _derive(key, self.salt, _DATA_INFO)
        self._aead = self.lib.AESGCM(self._key)  # small chunks in one call each (5 us vs 30 us a stream here)
        self._head = _aad_head(name)

    def encrypt_small(self, index: int, offset: int, src: memoryview, dst: memoryview) -> bytes:
        """Encrypt a chunk of at most ``PIECE`` bytes in one call into ``dst``, which
        has room for 16 bytes more (overwritten: the tag, returned)."""
        n = len(src)
        self._aead.encrypt_into(_nonce(index), src, _aad(self._head, offset, n), dst[:n + TAG])
        return bytes(dst[n:n + TAG])

    def encryptor(self, index: int, offset: int, length: int) -> Any:
        """A streaming encryptor of chunk ``index`` (``length`` bytes at ``offset``):
        ``update_into(src, dst)`` piece by piece, then ``finalize()`` and ``.tag``."""
        lib = self.lib
        enc = lib.Cipher(lib.algorithms.AES(self._key), lib.modes.GCM(_nonce(index))).encryptor()
        enc.authenticate_additional_data(_aad(self._head, offset, length))
        return enc

    def encrypt(self, index: int, offset: int, src: memoryview, dst: memoryview) -> bytes:
        """Encrypt ``src`` (chunk ``index`` at ``offset``) into ``dst``; returns the tag."""
        enc = self.encryptor(index, offset, len(src))
        _pieces(enc, src, dst)
        enc.finalize()
        return enc.tag

    def decrypt(self, index: int, offset: int, buf: memoryview, tag: bytes) -> None:
        """Decrypt ``buf`` in place; ``CorruptCheckpointError`` if its tag fails."""
        lib = self.lib
        try:
            if len(buf) <= PIECE:  # one call (the input is a copy: ciphertext and tag must be contiguous)
                self._aead.decrypt_into(_nonce(index), b"".join((buf, tag)), _aad(self._head, offset, len(buf)), buf)
                return
            dec = lib.Cipher(lib.algorithms.AES(self._key), lib.modes.GCM(_nonce(index), tag)).decryptor()
            dec.authenticate_additional_data(_aad(self._head, offset, len(buf)))
            _pieces(dec, buf, buf)
            dec.finalize()
        except lib.InvalidTag:
            raise CorruptCheckpointError(f"the chunk at offset {offset} ({len(buf)} bytes) fails its "
                                         "authentication tag: altered, moved or from another checkpoint") from None


# ----------------------------------------------------------------------------- the manifest
def is_sealed(data: bytes) -> bool:
    """Whether manifest bytes are a version-2 (encrypted) envelope, judged by its
    first bytes (no decoding of what follows)."""
    return data[:1] == b"\x87" and b"\xa7version\x02" in data[:64]  # fixmap of 7: {"format", "version": 2, ...


def envelope(data: bytes, where: str) -> dict:
    """The readable part of a sealed manifest: version, cipher, key fingerprint, sizes."""
    try:
        outer = msgpack.unpackb(data, raw=False, max_bin_len=MAX_SEALED, max_str_len=256, max_map_len=16,
                                max_array_len=0, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as e:
        raise CorruptCheckpointError(f"{where}: unreadable encrypted manifest envelope ({e})") from None
    want = {"format": str, "version": int, "cipher": str, "key": str, "salt": bytes, "nonce": bytes, "sealed": bytes}
    if not isinstance(outer, dict) or set(outer) != set(want) or any(
            type(outer[k]) is not t for k, t in want.items()):
        raise CorruptCheckpointError(f"{where}: malformed encrypted manifest envelope")
    if outer["version"] != VERSION or outer["cipher"] != CIPHER:
        raise CorruptCheckpointError(f"{where}: encrypted with {outer['cipher']!r}, format version "
                                     f"{outer['version']}; this reader knows {CIPHER!r} version {VERSION}")
    if len(outer["salt"]) != 16 or len(outer["nonce"]) != 12 or len(outer["sealed"]) < TAG:
        raise CorruptCheckpointError(f"{where}: malformed encrypted manifest envelope (salt, nonce or size)")
    return outer


def seal_manifest(key: bytes, manifest: bytes, files: list[tuple[bytes, bytes]]) -> bytes:
    """The version-2 envelope of ``manifest`` (v1 bytes) and each data file's (salt, tags)."""
    lib = _lib()
    inner = msgpack.packb({"manifest": manifest, "files": [[s, t] for s, t in files]}, use_bin_type=True)
    salt, nonce, fp = os.urandom(16), os.urandom(12), fingerprint(key)
    sealed = lib.AESGCM(_derive(key, salt, _MANIFEST_INFO)).encrypt(nonce, inner, _header_aad(fp))
    return msgpack.packb({"format": "jaxckpt", "version": VERSION, "cipher": CIPHER, "key": fp, "salt": salt,
                          "nonce": nonce, "sealed": sealed}, use_bin_type=True)


def _header_aad(fp: str) -> bytes:
    return f"jaxckpt manifest v{VERSION} {CIPHER} {fp}".encode()


def open_manifest(key: bytes | None, data: bytes, where: str) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """(the v1 manifest bytes, each file's (salt, tags)) of a sealed manifest.
    ``DecryptionError`` without a key or with another key; ``CorruptCheckpointError``
    if the envelope or what it seals was altered."""
    outer = envelope(data, where)
    fp = outer["key"]
    if key is None:
        raise DecryptionError(f"{where}: the checkpoint is encrypted (key fingerprint {fp}); pass "
                              "encryption_key= (or --key-file / JAXCKPT_KEY_FILE on the command line)")
    if fingerprint(key) != fp:
        raise DecryptionError(f"{where}: wrong key: the checkpoint was encrypted with the key whose fingerprint "
                              f"is {fp}; the key given has fingerprint {fingerprint(key)}")
    lib = _lib()
    try:
        inner = lib.AESGCM(_derive(key, outer["salt"], _MANIFEST_INFO)).decrypt(outer["nonce"], outer["sealed"],
                                                                               _header_aad(fp))
    except lib.InvalidTag:
        raise CorruptCheckpointError(f"{where}: the encrypted manifest fails its authentication tag (altered)"
                                     ) from None
    body = msgpack.unpackb(inner, raw=False, max_bin_len=MAX_SEALED, strict_map_key=True)
    if not (isinstance(body, dict) and isinstance(body.get("manifest"), bytes) and isinstance(body.get("files"), list)
            and all(isinstance(f, list) and len(f) == 2 and all(isinstance(x, bytes) for x in f)
                    for f in body["files"])):
        raise CorruptCheckpointError(f"{where}: malformed sealed manifest")
    return body["manifest"], [(s, t) for s, t in body["files"]]
