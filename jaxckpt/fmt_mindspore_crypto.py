"""The encrypted layer of MindSpore ``.ckpt`` files (``enc_key``), for :mod:`jaxckpt.fmt_mindspore`.

Layout (MindSpore 2.x ``core/utils/crypto.cc``, checked against files MindSpore 2.10 writes): the plaintext,
the protobuf stream of a plain file, is cut into blocks of at most 64 MiB, each stored as ``int32 magic``,
(AES-GCM only) the 16-byte tag, ``int32 24 + len(ct)``, ``int32 16``, a 16-byte IV, ``int32 len(ct)`` and
``ct``; int32s little-endian; magic 0x7F3A5ED8 AES-GCM, 0x7F3A5ED9 AES-CBC, 0x7F3A5EDA SM4-CBC. The key is
used as given (16, 24 or 32 bytes; 16 for SM4), not derived. CBC pads with PKCS#7. GCM has no AAD and, as
MindSpore re-initialises OpenSSL's context after setting the IV length, uses only the first 12 bytes of the
stored IV. ``cryptography`` is imported on first use: an optional dependency (``jaxckpt[mindspore]``).
"""

from __future__ import annotations

import os
from typing import BinaryIO

from jaxckpt.errors import CorruptCheckpointError, DecryptionError, UnsupportedValueError

MAX_CIPHER_BLOCK = (64 << 20) + 16  # cap: one block's ciphertext, MindSpore's MAX_BLOCK_SIZE plus CBC padding
BLOCK_BYTES = 64 << 20  # MindSpore's ENCRYPT_BLOCK_SIZE: plaintext per block
MAGIC = {"AES-GCM": 0x7F3A5ED8, "AES-CBC": 0x7F3A5ED9, "SM4-CBC": 0x7F3A5EDA}
MODE_OF = {magic: mode for mode, magic in MAGIC.items()}
KEY_LENGTHS = {"AES-GCM": (16, 24, 32), "AES-CBC": (16, 24, 32), "SM4-CBC": (16,)}
_IV, _TAG, _NONCE = 16, 16, 12
_CRC_TRAILER = (b"crc_num", 17)  # what MindSpore appends after the blocks for crc_check with enc_key


def _cipher_kit():
    """A cipher factory, PKCS#7 and GCM's authentication error, from ``cryptography``."""
    try:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives import padding
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    except ImportError as e:
        raise UnsupportedValueError("encrypted MindSpore checkpoints need the 'cryptography' package: "
                                    "pip install 'jaxckpt[mindspore]'") from e

    def cipher(mode: str, key: bytes, iv: bytes, tag: bytes | None = None):
        if mode == "AES-GCM":
            return Cipher(algorithms.AES(key), modes.GCM(iv[:_NONCE], tag))
        return Cipher((algorithms.AES if mode == "AES-CBC" else algorithms.SM4)(key), modes.CBC(iv))
    return cipher, padding.PKCS7(128), InvalidTag


def _decrypt_block(kit, mode: str, key: bytes, iv: bytes, tag: bytes, ct: bytes) -> bytes | None:
    """The plaintext of one block, or None if GCM's authentication or CBC's padding fails."""
    cipher, pkcs7, invalid_tag = kit
    dec = cipher(mode, key, iv, tag if mode == "AES-GCM" else None).decryptor()
    try:
        plain = dec.update(ct) + dec.finalize()
        if mode == "AES-GCM":
            return plain
        unpad = pkcs7.unpadder()
        return unpad.update(plain) + unpad.finalize()
    except (invalid_tag, ValueError):
        return None


def _encrypt_block(kit, mode: str, key: bytes, plain: bytes) -> bytes:
    cipher, pkcs7, _ = kit
    iv = os.urandom(_IV)
    enc = cipher(mode, key, iv).encryptor()
    if mode != "AES-GCM":
        pad = pkcs7.padder()
        plain = pad.update(plain) + pad.finalize()
    ct = enc.update(plain) + enc.finalize()
    tag = enc.tag if mode == "AES-GCM" else b""
    i32 = lambda n: n.to_bytes(4, "little")  # noqa: E731
    return b"".join((i32(MAGIC[mode]), tag, i32(24 + len(ct)), i32(_IV), iv, i32(len(ct)), ct))


def sealed_size(plain: int, mode: str, block_bytes: int) -> int:
    """The bytes ``BlockWriter`` writes for ``plain`` bytes of plaintext: full
    blocks of ``block_bytes``, the last one short (``_encrypt_block``'s framing:
    magic, GCM tag, sizes, IV; CBC pads each block to whole 16-byte blocks)."""
    def sealed(n: int) -> int:
        gcm = mode == "AES-GCM"
        return 32 + (_TAG if gcm else 0) + (n if gcm else (n // 16 + 1) * 16)
    full, rest = divmod(plain, block_bytes)
    return full * sealed(block_bytes) + (sealed(rest) if rest else 0)


def check_key(where: str, dec_key: bytes | None, dec_mode: str, mode: str) -> None:
    """DecryptionError unless ``dec_key`` and ``dec_mode`` can decrypt a file encrypted with ``mode``."""
    if dec_key is None:
        raise DecryptionError(f"{where}: the file is encrypted ({mode}); pass dec_key= (and dec_mode={mode!r}; "
                              f"--dec-key-file and --dec-mode {mode} on the command line)")
    if dec_mode not in MAGIC:
        raise ValueError(f"dec_mode must be one of {sorted(MAGIC)}, not {dec_mode!r}")
    if dec_mode != mode:
        raise DecryptionError(f"{where}: the file is encrypted with {mode}, but dec_mode is {dec_mode!r}")
    if not isinstance(dec_key, bytes) or len(dec_key) not in KEY_LENGTHS[mode]:
        got = f"{len(dec_key)} bytes" if isinstance(dec_key, bytes) else type(dec_key).__name__
        raise DecryptionError(f"{where}: a {mode} dec_key is bytes of length {KEY_LENGTHS[mode]}; this is the "
                              f"wrong key ({got})")


def check_enc_options(enc_key, enc_mode: str, block_bytes: int, crc_check: bool) -> None:
    """ValueError unless the writer can encrypt with these."""
    if crc_check:
        raise ValueError("crc_check and enc_key exclude each other: MindSpore cannot read such a file")
    if enc_mode not in MAGIC:
        raise ValueError(f"enc_mode must be one of {sorted(MAGIC)}, not {enc_mode!r}")
    if not isinstance(enc_key, bytes) or len(enc_key) not in KEY_LENGTHS[enc_mode]:
        raise ValueError(f"a {enc_mode} enc_key is bytes of length {KEY_LENGTHS[enc_mode]}")
    if not 16 <= block_bytes <= BLOCK_BYTES:
        raise ValueError(f"block_bytes must be in 16..{BLOCK_BYTES}")


class BlockReader:
    """The plaintext of an encrypted file, decrypted one block at a time (``readinto``, as a raw file).

    A wrong key is found on the first block: GCM's authentication fails, or CBC's padding or the first
    plaintext byte (a MindSpore file opens with record 1, 0x0A) is wrong; either gives DecryptionError.
    Damage after the first block gives CorruptCheckpointError.
    """

    def __init__(self, f: BinaryIO, size: int, key: bytes, mode: str, where: str):
        self.f, self.left, self.key, self.mode, self.where = f, size, key, mode, where
        self.kit, self.block, self.pos, self.index = _cipher_kit(), memoryview(b""), 0, 0

    def bound(self) -> int:
        """At most this many plaintext bytes remain (plaintext is never longer than its ciphertext)."""
        return self.left + len(self.block) - self.pos

    def readinto(self, mv: memoryview) -> int:
        while self.pos == len(self.block):
            if not self.left:
                return 0
            self.block, self.pos, self.index = memoryview(self._next_block()), 0, self.index + 1
        n = min(len(mv), len(self.block) - self.pos)
        mv[:n] = self.block[self.pos:self.pos + n]
        self.pos += n
        return n

    def _fail(self, what: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{self.where}: encrypted block {self.index}: {what}")

    def _take(self, n: int, what: str) -> bytes:
        data = self.f.read(n) if n <= self.left else b""
        if len(data) != n:
            raise self._fail(f"truncated {what}")
        self.left -= n
        return data

    def _next_block(self) -> bytes:
        gcm, (mark, trailer) = self.mode == "AES-GCM", _CRC_TRAILER
        if self.left == trailer and self.f.read(len(mark)) == mark:
            raise self._fail("a crc_num trailer follows the blocks: MindSpore writes crc_check with enc_key, "
                             "but cannot read it")
        self.f.seek(-len(mark) if self.left == trailer else 0, os.SEEK_CUR)
        head = self._take(8 + (_TAG if gcm else 0), "header")
        size = int.from_bytes(head[-4:], "little", signed=True)
        if int.from_bytes(head[:4], "little") != MAGIC[self.mode] or not 24 < size <= 24 + MAX_CIPHER_BLOCK:
            raise self._fail(f"no {self.mode} magic, or it claims {size} bytes, outside (24, "
                             f"{24 + MAX_CIPHER_BLOCK}]")
        body = self._take(size, "body")
        ct_len = int.from_bytes(body[20:24], "little", signed=True)
        if int.from_bytes(body[:4], "little") != _IV or ct_len != size - 24 or (not gcm and ct_len % 16):
            raise self._fail("inconsistent IV or ciphertext length")
        plain = _decrypt_block(self.kit, self.mode, self.key, body[4:20], head[4:-4], body[24:])
        if self.index == 0 and (plain is None or plain[:1] != b"\x0a"):
            why = "authentication fails" if gcm else "its padding or first byte is wrong"
            raise DecryptionError(f"{self.where}: cannot decrypt the first block with this dec_key ({self.mode} "
                                  f"{why}): the key is wrong, or the file is damaged")
        if plain is None:
            raise self._fail(f"fails {'authentication' if gcm else 'its padding check'}: the file is damaged")
        return plain


class BlockWriter:
    """Plaintext gathered into blocks of ``block_bytes``, each encrypted and written to ``f`` when full."""

    def __init__(self, f: BinaryIO, key: bytes, mode: str, block_bytes: int):
        self.f, self.key, self.mode, self.size = f, key, mode, block_bytes
        self.kit, self.buf = _cipher_kit(), bytearray()

    def write(self, piece: bytes | memoryview) -> None:
        mv = memoryview(piece)
        while len(mv):
            k = min(len(mv), self.size - len(self.buf))
            self.buf += mv[:k]
            mv = mv[k:]
            if len(self.buf) == self.size:
                self.flush()

    def flush(self) -> None:
        """Encrypt and write what is gathered (call once at the end: a short block is the last)."""
        if self.buf:
            self.f.write(_encrypt_block(self.kit, self.mode, self.key, bytes(self.buf)))
            self.buf = bytearray()
