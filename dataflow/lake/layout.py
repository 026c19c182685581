"""Where each collection's tables live in the lake.

append mode: the changelog at `<lake>/<db>/<collection>`. merge mode: the
changelog at `<lake>/_changelog/<db>/<collection>` (what the sink commits) and
the mirror at `<lake>/<db>/<collection>` (what the materializer keeps up to
date). `both`, an older name of merge mode, is the same. Names are written
into paths by `path_part`, which any legal MongoDB name survives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

CHANGELOG_DIR = "_changelog"
TableMode = Literal["merge", "append", "both"]


_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-.")
ESCAPE = "~"


def path_part(name: str) -> str:
    """A database or collection name as one path segment, reversibly (`name_of` undoes it).

    Letters, digits, `_`, `-` and `.` stay as they are, so the usual names keep
    their plain paths. Every other character is `~` and the two hex digits of
    each of its UTF-8 bytes (`café` → `caf~C3~A9`, `a b` → `a~20b`). Not `%`:
    delta-rs and object stores decode percent-escapes, so a table created at
    `caf%C3%A9` would be looked for at `café`. The first character is escaped
    too when the name is nothing but dots (`..` must not climb out of the lake)
    or is the changelog folder's (a database named `_changelog`).
    """
    if not name:
        raise ValueError("an empty name has no path")
    out = [ch if ch in _SAFE else _escaped(ch) for ch in name]
    if name == CHANGELOG_DIR or set(name) <= {"."}:
        out[0] = _escaped(name[0])
    return "".join(out)


def _escaped(ch: str) -> str:
    return "".join(f"{ESCAPE}{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))


def name_of(part: str) -> str:
    """The name a path segment made by `path_part` stands for."""
    if ESCAPE not in part:
        return part
    raw = bytearray()
    i = 0
    while i < len(part):
        if part[i] == ESCAPE:
            raw.append(int(part[i + 1 : i + 3], 16))
            i += 3
        else:
            raw.extend(part[i].encode())
            i += 1
    return raw.decode("utf-8", "surrogatepass")


@dataclass(frozen=True)
class TableLocations:
    """The tables of a lake for one table mode."""

    lake_uri: str
    table_mode: TableMode = "merge"

    @property
    def merge(self) -> bool:
        """Whether the lake keeps mirrors beside the changelogs."""
        return self.table_mode != "append"

    def uri(self, db: str, collection: str, mode: str) -> str:
        """The changelog (`mode="append"`) or the mirror (`"merge"`) of a collection."""
        base = self.lake_uri.rstrip("/")
        path = f"{path_part(db)}/{path_part(collection)}"
        if self.merge and mode == "append":
            return f"{base}/{CHANGELOG_DIR}/{path}"
        return f"{base}/{path}"
