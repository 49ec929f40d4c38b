"""Streaming tar table of contents: uncompressed tar bytes in, zTOC FileMetadata entries out."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import LayerError
from .model import BLOCK, CHAR, DIR, FIFO, HARDLINK, REG, SYMLINK, FileMetadata, format_mod_time

__all__ = ["MAX_SPECIAL_SIZE", "TarTocParser", "TocResult", "parse_tar_toc"]

_BLOCK_SIZE = 512
_ZERO_BLOCK = bytes(_BLOCK_SIZE)
_ZERO_CHKSUM = bytes(8)

# Go's archive/tar (which upstream uses) refuses PAX and GNU long-name payloads above 1 MiB; the same cap
# bounds the only bytes this parser ever buffers besides one header block.
MAX_SPECIAL_SIZE = 1 << 20

# name mode uid gid size mtime chksum typeflag linkname magic version uname gname devmajor devminor
# prefix(155) rest(12); the star variant keeps its prefix in the first 131 bytes and "tar\0" at 508.
_HEADER = struct.Struct("100s8s8s8s12s12s8sc100s6s2s32s32s8s8s155s12s")

_MAGIC_USTAR = b"ustar\x00"
_MAGIC_GNU = b"ustar "
_VERSION_GNU = b" \x00"
_TRAILER_STAR = b"tar\x00"

# Typeflags upstream maps to a zTOC type. Everything else (GNU sparse 'S', dumpdir 'D', volume 'V',
# multi-volume 'M', old long names 'N', contiguous '7', vendor extensions) reaches upstream's getType
# unchanged and is refused there, so it is refused here too.
_TYPES = {
    b"0": REG,
    b"1": HARDLINK,
    b"2": SYMLINK,
    b"3": CHAR,
    b"4": BLOCK,
    b"5": DIR,
    b"6": FIFO,
}
_REFUSED_NAMES = {
    b"7": "contiguous file",
    b"S": "GNU sparse file",
    b"D": "GNU dumpdir",
    b"V": "GNU volume header",
    b"M": "GNU multi-volume continuation",
    b"N": "GNU old long name",
}
# Types whose header size field does not announce data: Go skips no data for them whatever the size says.
_HEADER_ONLY = frozenset({HARDLINK, SYMLINK, CHAR, BLOCK, DIR, FIFO})

_PAX_X = b"x"
_PAX_G = b"g"
_GNU_LONGNAME = b"L"
_GNU_LONGLINK = b"K"
_SPECIALS = frozenset({_PAX_X, _PAX_G, _GNU_LONGNAME, _GNU_LONGLINK})

_INT64_MAX = (1 << 63) - 1
_CACHE_LIMIT = 8192

# Parser states.
_S_HEADER = 0  # expecting a header block
_S_SPECIAL = 1  # collecting the payload of a PAX or GNU long-name header
_S_ZERO = 2  # one zero block seen; the next must be zero too
_S_DONE = 3  # end-of-archive seen; the rest (record padding) is ignored


def _decode(raw: bytes) -> str:
    # Go keeps names as raw bytes and flatbuffers stores them verbatim; surrogateescape keeps that
    # round trip exact (encode with "utf-8", "surrogateescape" to get the stored bytes back).
    return raw.decode("utf-8", "surrogateescape")


def _cstr(raw: bytes) -> bytes:
    """A NUL-terminated header string field."""
    return raw.partition(b"\x00")[0]


def _align(n: int) -> int:
    return (n + _BLOCK_SIZE - 1) & ~(_BLOCK_SIZE - 1)


@dataclass(slots=True)
class TocResult:
    """What a finished parse yields: one entry per tar member, and where the archive's end marker ends."""

    files: list[FileMetadata]
    uncompressed_archive_size: int


class _BadField(ValueError):
    pass


def _numeric(field: bytes) -> int:
    """A numeric header field: octal text, or GNU/star base-256 when the top bit of the first byte is set."""
    if field and field[0] & 0x80:
        value = int.from_bytes(field, "big") & ~(0x80 << (8 * (len(field) - 1)))
        if field[0] & 0x40:
            # Negative: two's complement over the field width, sign bit included.
            value = int.from_bytes(field, "big") - (1 << (8 * len(field)))
        if not -_INT64_MAX - 1 <= value <= _INT64_MAX:
            raise _BadField("base-256 value out of range")
        return value
    text = _cstr(field.strip(b" \x00"))
    if not text:
        return 0
    if not text.isdigit():
        raise _BadField(f"not an octal number: {field!r}")
    try:
        value = int(text, 8)
    except ValueError:
        raise _BadField(f"not an octal number: {field!r}") from None
    if value > 0xFFFF_FFFF_FFFF_FFFF:
        raise _BadField(f"octal value out of range: {field!r}")
    return value


def _pax_int(key: str, raw: bytes) -> int:
    """A decimal PAX value, as strict as Go's strconv.ParseInt."""
    digits = raw[1:] if raw[:1] in (b"+", b"-") else raw
    if not digits or not digits.isdigit():
        raise _BadField(f"PAX {key} is not a decimal number: {raw!r}")
    value = int(raw)
    if not -_INT64_MAX - 1 <= value <= _INT64_MAX:
        raise _BadField(f"PAX {key} out of range: {raw!r}")
    return value


def _pax_time(raw: bytes) -> tuple[int, int]:
    """A PAX time "secs[.frac]" as (seconds, nanoseconds >= 0); extra fraction digits are truncated."""
    secs_raw, dot, frac = raw.partition(b".")
    secs = _pax_int("mtime", secs_raw)
    if not dot:
        return secs, 0
    if frac and not frac.isdigit():
        raise _BadField(f"PAX mtime has a bad fraction: {raw!r}")
    nanos = int((frac[:9]).ljust(9, b"0"))
    if secs_raw.startswith(b"-") and nanos:
        # "-1.5" means 1.5 s before the epoch: borrow a second so nanoseconds stay positive.
        return secs - 1, 1_000_000_000 - nanos
    return secs, nanos


def _parse_pax(payload: bytes) -> dict[str, bytes]:
    """PAX records "<len> <key>=<value>\\n", validated like Go's archive/tar (which upstream relies on)."""
    records: dict[str, bytes] = {}
    sparse: list[bytes] = []
    pos = 0
    end = len(payload)
    while pos < end:
        space = payload.find(b" ", pos, pos + 21)
        if space < 0:
            raise _BadField("PAX record without a length")
        length_raw = payload[pos:space]
        if not length_raw.isdigit():
            raise _BadField(f"PAX record length is not a number: {length_raw!r}")
        length = int(length_raw)
        rec_end = pos + length
        if length < 5 or rec_end > end or rec_end <= space + 1 or payload[rec_end - 1] != 0x0A:
            raise _BadField("PAX record length does not match its text")
        key_raw, eq, value = payload[space + 1 : rec_end - 1].partition(b"=")
        if not eq or not key_raw:
            raise _BadField(f"PAX record without a key: {key_raw!r}")
        key = _decode(key_raw)
        if key in ("path", "linkpath", "uname", "gname"):
            if b"\x00" in value:
                raise _BadField(f"PAX {key} contains NUL")
        elif b"\x00" in key_raw:
            raise _BadField("PAX key contains NUL")
        if key in ("GNU.sparse.offset", "GNU.sparse.numbytes"):
            # GNU sparse 0.0 repeats these keys; Go folds them into one GNU.sparse.map record.
            sparse.append(value)
        else:
            records[key] = value
        pos = rec_end
    if sparse:
        records["GNU.sparse.map"] = b",".join(sparse)
    return records


class TarTocParser:
    """Push parser: feed the uncompressed tar in any chunking, then call finish().

    Only header blocks and PAX / GNU long-name payloads (at most MAX_SPECIAL_SIZE) are buffered; member
    data is skipped by counting. Names and link targets are recorded exactly as stored, including
    absolute paths and ".." components: sanitizing them is the filesystem layer's job.

    PAX global headers ('g') are consumed and their records are not applied to later members (Go's
    archive/tar does not merge them either). PAX sparse files (GNU.sparse.* records) are refused: their
    data is not a contiguous copy of the file, so a zTOC offset cannot describe it.

    With `allow_missing_end`, an archive that stops cleanly at a member boundary (or after a single zero
    block) is accepted as Go's archive/tar accepts it; by default a missing end-of-archive marker is an
    error because it usually means a truncated layer.
    """

    __slots__ = (
        "_allow_missing_end",
        "_buf",
        "_end",
        "_files",
        "_global_pax",
        "_longlink",
        "_longname",
        "_mtimes",
        "_need",
        "_nums",
        "_pax",
        "_pos",
        "_skip",
        "_skip_what",
        "_special",
        "_state",
        "_strs",
    )

    def __init__(self, *, allow_missing_end: bool = False) -> None:
        self._allow_missing_end = allow_missing_end
        self._pos = 0  # absolute offset of the next byte feed() will see
        self._skip = 0  # bytes of member data and padding still to pass over
        self._skip_what = ""  # the member whose data is being skipped, for truncation messages
        self._buf = bytearray()  # partial header block or special payload
        self._need = _BLOCK_SIZE  # bytes _buf must reach before it is processed
        self._state = _S_HEADER
        self._special: tuple[bytes, int, str] | None = None  # (typeflag, payload size, header name)
        self._pax: dict[str, bytes] | None = None
        self._global_pax: dict[str, bytes] | None = None
        self._longname: bytes | None = None
        self._longlink: bytes | None = None
        self._files: list[FileMetadata] = []
        self._end = -1
        # Layers repeat the same mode/uid/gid/owner fields and mtimes thousands of times.
        self._nums: dict[bytes, int] = {}
        self._strs: dict[bytes, str] = {}
        self._mtimes: dict[tuple[int, int], str] = {}

    @property
    def position(self) -> int:
        """Bytes fed so far."""
        return self._pos

    @property
    def files(self) -> list[FileMetadata]:
        """The entries parsed so far, in order (the parser's own list: read it, do not change it)."""
        return self._files

    @property
    def done(self) -> bool:
        """Whether the end-of-archive marker has been seen."""
        return self._state == _S_DONE

    @property
    def global_pax(self) -> dict[str, bytes]:
        """Records of the last PAX global header, if any (not applied to members, see the class doc)."""
        return dict(self._global_pax or {})

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Consume the next piece of the uncompressed tar stream."""
        mv = memoryview(data)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        n = len(mv)
        i = 0
        base = self._pos
        buf = self._buf
        try:
            while i < n:
                if self._skip:
                    take = n - i
                    if take > self._skip:
                        take = self._skip
                    self._skip -= take
                    i += take
                    continue
                state = self._state
                if state == _S_DONE:
                    i = n
                    break
                need = self._need
                if buf:
                    take = need - len(buf)
                    if take > n - i:
                        take = n - i
                    buf += mv[i : i + take]
                    i += take
                    if len(buf) < need:
                        break
                    block: bytes | memoryview = bytes(buf)
                    buf.clear()
                elif n - i >= need:
                    block = mv[i : i + need]
                    i += need
                else:
                    buf += mv[i:]
                    i = n
                    break
                if state == _S_HEADER:
                    self._header(block, base + i)
                elif state == _S_SPECIAL:
                    self._special_payload(bytes(block))
                else:
                    if block != _ZERO_BLOCK:
                        raise LayerError(
                            f"bad tar archive: a zero block is followed by a non-zero block at offset "
                            f"{base + i - _BLOCK_SIZE}"
                        )
                    self._end = base + i
                    self._state = _S_DONE
        finally:
            self._pos = base + n

    def finish(self) -> TocResult:
        """Check the stream ended properly and return the table of contents."""
        if self._state != _S_DONE:
            clean_stop = not self._skip and not self._buf and self._state in (_S_HEADER, _S_ZERO)
            pending = self._pax is not None or self._longname is not None or self._longlink is not None
            if self._allow_missing_end and clean_stop and not pending:
                self._end = self._pos
            elif self._skip:
                raise LayerError(
                    f"truncated tar archive: it ends inside the data of {self._skip_what} "
                    f"({self._skip} bytes missing)"
                )
            elif self._state == _S_SPECIAL and self._special is not None:
                raise LayerError(
                    f"truncated tar archive: it ends inside the extended header {self._special[2]!r}"
                )
            elif self._buf:
                raise LayerError(
                    f"truncated tar archive: it ends inside a header block at offset "
                    f"{self._pos - len(self._buf)}"
                )
            elif pending:
                raise LayerError("truncated tar archive: it ends after an extended header without its member")
            else:
                raise LayerError(
                    f"truncated tar archive: no end-of-archive marker (stream ends at offset {self._pos})"
                )
        return TocResult(self._files, self._end)

    def _special_payload(self, block: bytes) -> None:
        assert self._special is not None
        flag, size, hname = self._special
        payload = block[:size]
        self._special = None
        self._state = _S_HEADER
        self._need = _BLOCK_SIZE
        if flag in (_PAX_X, _PAX_G):
            try:
                records = _parse_pax(payload)
            except _BadField as e:
                raise LayerError(f"bad tar archive: PAX header {hname!r}: {e}") from None
            if flag == _PAX_X:
                # A second 'x' before the member replaces the first, as in Go.
                self._pax = records
            else:
                self._global_pax = records
        elif flag == _GNU_LONGNAME:
            # An empty long name leaves the header's own name in force, as in Go.
            self._longname = _cstr(payload) or None
        else:
            self._longlink = _cstr(payload) or None

    def _header(self, block: bytes | memoryview, data_off: int) -> None:
        """Process one header block; `data_off` is the stream offset just after it."""
        (
            name_f,
            mode_f,
            uid_f,
            gid_f,
            size_f,
            mtime_f,
            chk_f,
            flag,
            link_f,
            magic,
            version,
            uname_f,
            gname_f,
            major_f,
            minor_f,
            prefix_f,
            tail_f,
        ) = _HEADER.unpack_from(block)
        hdr_off = data_off - _BLOCK_SIZE
        if chk_f == _ZERO_CHKSUM and block == _ZERO_BLOCK:
            if self._pax is not None or self._longname is not None or self._longlink is not None:
                raise LayerError(
                    f"bad tar archive: end-of-archive marker at offset {hdr_off} right after an "
                    f"extended header"
                )
            self._state = _S_ZERO
            return
        self._check_sum(block, chk_f, hdr_off)

        nums = self._nums
        strs = self._strs
        try:
            # Fast path for the common zero-padded octal field; anything else takes the full rules.
            digits = size_f[:11]
            if size_f[11] == 0 and digits.isdigit() and b"8" not in digits and b"9" not in digits:
                size = int(digits, 8)
            else:
                size = _numeric(size_f)
            if size < 0:
                raise _BadField("negative size")
        except _BadField as e:
            raise LayerError(f"bad tar header at offset {hdr_off} ({_cstr(name_f)!r}): {e}") from None

        if flag in _SPECIALS:
            if size > MAX_SPECIAL_SIZE:
                raise LayerError(
                    f"bad tar archive: extended header {_decode(_cstr(name_f))!r} at offset {hdr_off} "
                    f"is {size} bytes (limit {MAX_SPECIAL_SIZE})"
                )
            self._special = (flag, size, _decode(_cstr(name_f)))
            if size == 0:
                self._special_payload(b"")
            else:
                self._state = _S_SPECIAL
                self._need = _align(size)
            return

        if magic == _MAGIC_USTAR:
            fmt = 2 if tail_f[8:12] == _TRAILER_STAR else 1  # 1 ustar/pax, 2 star
        elif magic == _MAGIC_GNU and version == _VERSION_GNU:
            fmt = 3
        else:
            fmt = 0  # V7: no owner names, device numbers or prefix

        try:
            mode = nums.get(mode_f)
            if mode is None:
                mode = self._cache_num(mode_f)
            uid = nums.get(uid_f)
            if uid is None:
                uid = self._cache_num(uid_f)
            gid = nums.get(gid_f)
            if gid is None:
                gid = self._cache_num(gid_f)
            digits = mtime_f[:11]
            if mtime_f[11] == 0 and digits.isdigit() and b"8" not in digits and b"9" not in digits:
                mtime = int(digits, 8)
            else:
                mtime = _numeric(mtime_f)
            if fmt:
                major = nums.get(major_f)
                if major is None:
                    major = self._cache_num(major_f)
                minor = nums.get(minor_f)
                if minor is None:
                    minor = self._cache_num(minor_f)
            else:
                major = minor = 0
        except _BadField as e:
            raise LayerError(f"bad tar header at offset {hdr_off} ({_cstr(name_f)!r}): {e}") from None

        if fmt == 0:
            uname = gname = ""
        else:
            uname = strs.get(uname_f)
            if uname is None:
                uname = self._cache_str(uname_f)
            gname = strs.get(gname_f)
            if gname is None:
                gname = self._cache_str(gname_f)

        name_b = name_f.partition(b"\x00")[0]
        if fmt == 1 or fmt == 2:
            prefix = (prefix_f if fmt == 1 else prefix_f[:131]).partition(b"\x00")[0]
            if prefix:
                name_b = prefix + b"/" + name_b
        link_b = link_f.partition(b"\x00")[0]
        name = _decode(name_b)
        linkname = _decode(link_b) if link_b else ""
        nanos = 0

        pax = self._pax
        if pax is not None:
            self._pax = None
            try:
                for key, value in pax.items():
                    if not value:
                        continue  # an empty record keeps the header's value (Go does the same)
                    if key == "path":
                        name = _decode(value)
                    elif key == "linkpath":
                        linkname = _decode(value)
                    elif key == "size":
                        size = _pax_int(key, value)
                        if size < 0:
                            raise _BadField("negative PAX size")
                    elif key == "uid":
                        uid = _pax_int(key, value)
                    elif key == "gid":
                        gid = _pax_int(key, value)
                    elif key == "uname":
                        uname = _decode(value)
                    elif key == "gname":
                        gname = _decode(value)
                    elif key == "mtime":
                        mtime, nanos = _pax_time(value)
            except _BadField as e:
                raise LayerError(f"bad PAX header for tar entry {name!r} at offset {hdr_off}: {e}") from None
            pax = dict(sorted(pax.items()))
        else:
            pax = {}
        if self._longname is not None:
            name = _decode(self._longname)
            self._longname = None
        if self._longlink is not None:
            linkname = _decode(self._longlink)
            self._longlink = None

        ftype = _TYPES.get(flag)
        if ftype is None:
            if flag == b"\x00":
                # Pre-POSIX regular file; Go reads a trailing slash as a directory, as old tars meant.
                ftype = DIR if name.endswith("/") else REG
            else:
                what = _REFUSED_NAMES.get(flag, "unknown entry type")
                raise LayerError(
                    f"unsupported tar entry type {flag.decode('latin-1')!r} ({what}) for {name!r} "
                    f"at offset {hdr_off}"
                )
        if pax and any(k.startswith("GNU.sparse.") for k in pax):
            raise LayerError(f"unsupported tar entry {name!r} at offset {hdr_off}: PAX sparse file")

        key = (mtime, nanos)
        mod_time = self._mtimes.get(key)
        if mod_time is None:
            try:
                mod_time = format_mod_time(mtime, nanos)
            except (OverflowError, OSError, ValueError):
                raise LayerError(
                    f"tar entry {name!r} at offset {hdr_off}: mtime {mtime} out of range"
                ) from None
            if len(self._mtimes) < _CACHE_LIMIT:
                self._mtimes[key] = mod_time

        self._files.append(
            FileMetadata(
                name, ftype, data_off, size, linkname, mode, uid, gid,
                uname, gname, mod_time, major, minor, pax,
            )
        )
        if ftype not in _HEADER_ONLY and size:
            self._skip = (size + 511) & ~511
            self._skip_what = f"{name!r} (data at offset {data_off}, {size} bytes)"

    def _check_sum(self, block: bytes | memoryview, chk_f: bytes, hdr_off: int) -> None:
        # The checksum counts its own field as spaces. adler32's low half is 1 + the byte sum mod 65521,
        # exact for 256 bytes (at most 65280), so two halves give the sum at C speed.
        total = (
            (zlib.adler32(block[:256]) & 0xFFFF) + (zlib.adler32(block[256:]) & 0xFFFF) - 2 - sum(chk_f) + 256
        )
        text = _cstr(chk_f.strip(b" \x00"))
        stored = int(text, 8) if text and text.isdigit() and b"8" not in text and b"9" not in text else -1
        if stored == total:
            return
        # Some old writers summed signed chars; Go accepts either.
        high = sum(1 for c in bytes(block[:148]) + bytes(block[156:]) if c & 0x80)
        if stored >= 0 and stored == total - 256 * high:
            return
        raise LayerError(
            f"bad tar header at offset {hdr_off}: checksum mismatch (not a tar archive, or corrupt)"
            f" near {_cstr(bytes(block[:100]))[:64]!r}"
        )

    def _cache_num(self, field: bytes) -> int:
        value = _numeric(field)
        if len(self._nums) < _CACHE_LIMIT:
            self._nums[field] = value
        return value

    def _cache_str(self, field: bytes) -> str:
        value = _decode(_cstr(field))
        if len(self._strs) < _CACHE_LIMIT:
            self._strs[field] = value
        return value


def parse_tar_toc(
    chunks: Iterable[bytes | bytearray | memoryview], *, allow_missing_end: bool = False
) -> TocResult:
    """Convenience: run a TarTocParser over an iterable of uncompressed chunks."""
    parser = TarTocParser(allow_missing_end=allow_missing_end)
    for chunk in chunks:
        parser.feed(chunk)
    return parser.finish()
