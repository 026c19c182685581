"""Where each collection's tables live in the lake, and which tables a table mode writes.

`<lake>/<db>/<collection>` holds the table a mode writes; in `both` mode the
changelog of that table is `<lake>/_changelog/<db>/<collection>`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import quote

CHANGELOG_DIR = "_changelog"
TableMode = Literal["merge", "append", "both"]


def path_part(name: str) -> str:
    """A database or collection name as one safe path segment.

    MongoDB allows `/` and even `..` in collection names; those must not
    escape the lake or land two collections in one table.
    """
    quoted = quote(name, safe="")
    return quoted.replace(".", "%2E") if set(quoted) <= {"."} else quoted


@dataclass(frozen=True)
class TableLocations:
    """The tables of a lake for one table mode."""

    lake_uri: str
    table_mode: TableMode = "merge"

    @property
    def modes(self) -> tuple[Literal["merge", "append"], ...]:
        """The writer modes each batch is committed in, the primary one first."""
        return ("merge", "append") if self.table_mode == "both" else (self.table_mode,)

    def uri(self, db: str, collection: str, mode: str) -> str:
        base = self.lake_uri.rstrip("/")
        path = f"{path_part(db)}/{path_part(collection)}"
        if self.table_mode == "both" and mode == "append":
            return f"{base}/{CHANGELOG_DIR}/{path}"
        return f"{base}/{path}"
