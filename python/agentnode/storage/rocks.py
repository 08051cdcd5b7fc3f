"""rocksdict in raw mode (bytes keys and values) with the types it actually returns.

rocksdict types keys and values as any of str/int/float/bytes/bool because its default mode
pickles; with `raw_mode=True` they are always bytes, which these helpers state once.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import cast

from rocksdict import Options, Rdict, ReadOptions

__all__ = ["open_raw", "raw_get", "raw_items"]


def open_raw(path: Path) -> Rdict:
    """Opens (creating if missing) the RocksDB at `path` in raw mode."""
    opts = Options(raw_mode=True)
    opts.create_if_missing(True)
    return Rdict(str(path), opts)


def raw_get(db: Rdict, key: bytes) -> bytes | None:
    """The value of `key`, or None."""
    return cast("bytes | None", db.get(key))


def raw_items(
    db: Rdict, *, from_key: bytes, backwards: bool = False, read_opt: ReadOptions | None = None
) -> Iterator[tuple[bytes, bytes]]:
    """(key, value) pairs from `from_key` on, in key order (or reverse)."""
    items = db.items(backwards=backwards, from_key=from_key, read_opt=read_opt)
    return cast("Iterator[tuple[bytes, bytes]]", iter(items))
