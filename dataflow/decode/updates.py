"""A change stream's update description, applied to a stored document exactly as MongoDB did.

MongoDB's change streams (and Debezium in `change_streams` capture mode) send
an update as what changed, not the document: `updatedFields` and
`removedFields` keyed by dotted paths (`a.b`, `arr.1`), `truncatedArrays`
(`{"field": path, "newSize": n}`) and, from MongoDB 6.1 with expanded events,
`disambiguatedPaths`: for a path whose dots or numbers are ambiguous, its
components, array indexes as integers and field names as strings.

Without `disambiguatedPaths`, a dot separates components (MongoDB's own
reading) and a component made of digits indexes an array when the value there
is an array, and names a field otherwise. Order of application, as MongoDB
records it: truncations, then removals, then sets. A removed array element
becomes null (`$unset` leaves the slot); a set past the end of an array pads
it with nulls. A path through a value that is neither a document nor an array
cannot come from MongoDB: it means the stored document is not the one MongoDB
updated, and the change is refused as bad data rather than guessed at.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from dataflow.model import Reason
from dataflow.runtime.failures import BadData

Path = tuple[str | int, ...]
_MISSING: Any = object()


class UpdateError(ValueError):
    """An update description that cannot be read (the decoder dead-letters the message)."""


def _components(path: str, disambiguated: Mapping[str, Any]) -> Path:
    parts = disambiguated.get(path)
    if parts is not None:
        if type(parts) is not list or not parts or any(type(p) not in (str, int) for p in parts):
            raise UpdateError(f"disambiguatedPaths[{path!r}] must be a list of field names and indexes")
        return tuple(parts)
    if not path or any(not c for c in path.split(".")):
        raise UpdateError(f"field path {path!r} has an empty component")
    return tuple(path.split("."))


@dataclass(frozen=True, slots=True)
class Update:
    """One update description, its paths split into components."""

    set: tuple[tuple[Path, Any], ...] = ()
    unset: tuple[Path, ...] = ()
    truncate: tuple[tuple[Path, int], ...] = ()

    @classmethod
    def parse(
        cls,
        updated: Mapping[str, Any],
        removed: Iterable[str],
        truncated: Iterable[Any] = (),
        disambiguated: Mapping[str, Any] | None = None,
    ) -> Update:
        """From the decoded fields of an update description; raises UpdateError."""
        dis = disambiguated or {}
        trunc = []
        for t in truncated:
            if type(t) is not dict or type(t.get("field")) is not str or type(t.get("newSize")) is not int:
                raise UpdateError('truncatedArrays items must be {"field": <path>, "newSize": <int>}')
            if t["newSize"] < 0:
                raise UpdateError(f"truncatedArrays newSize {t['newSize']} is negative")
            trunc.append((_components(t["field"], dis), t["newSize"]))
        return cls(
            set=tuple((_components(k, dis), v) for k, v in updated.items()),
            unset=tuple(_components(k, dis) for k in removed),
            truncate=tuple(trunc),
        )

    @property
    def top_level(self) -> bool:
        """Whether it only sets and removes whole top-level fields (no stored value needed)."""
        return (
            not self.truncate
            and all(len(p) == 1 for p, _ in self.set)
            and all(len(p) == 1 for p in self.unset)
        )

    def fields(self) -> set[str]:
        """The top-level fields it changes."""
        paths = [p for p, _ in self.set] + list(self.unset) + [p for p, _ in self.truncate]
        return {str(p[0]) for p in paths}

    def apply(self, doc: dict[str, Any]) -> dict[str, Any]:
        """The document after the update. `doc` is not modified: changed fields are copied first."""
        out = dict(doc)
        for name in self.fields():
            if name in out:
                out[name] = copy.deepcopy(out[name])
        for path, size in self.truncate:
            arr = _get(out, path)
            if type(arr) is not list:
                _refuse(path, "truncates", arr)
            del arr[size:]
        for path in self.unset:
            parent = _parent(out, path, create=False)
            if parent is None:
                continue
            last = path[-1]
            if type(parent) is dict:
                parent.pop(str(last), None)
            elif _index(last) is not None and _index(last) < len(parent):  # type: ignore[operator]
                parent[_index(last)] = None  # type: ignore[index]
        for path, value in self.set:
            parent = _parent(out, path, create=True)
            last = path[-1]
            if type(parent) is dict:
                parent[str(last)] = copy.deepcopy(value)
            else:
                i = _index(last)
                if i is None:
                    _refuse(path, "sets", parent)
                parent.extend([None] * (i + 1 - len(parent)))  # type: ignore[union-attr]
                parent[i] = copy.deepcopy(value)  # type: ignore[index]
        return out

    def to_json(self) -> dict[str, Any]:
        """The description with paths as component lists: unambiguous, for the changelog."""
        return {
            "set": [[list(p), v] for p, v in self.set],
            "unset": [list(p) for p in self.unset],
            "truncate": [[list(p), n] for p, n in self.truncate],
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Update:
        return cls(
            set=tuple((tuple(p), v) for p, v in d.get("set", ())),
            unset=tuple(tuple(p) for p in d.get("unset", ())),
            truncate=tuple((tuple(p), n) for p, n in d.get("truncate", ())),
        )


def _index(c: str | int) -> int | None:
    if type(c) is int:
        return c if c >= 0 else None
    if type(c) is str and c.isascii() and c.isdigit():
        return int(c)
    return None


def _refuse(path: Path, what: str, value: Any) -> None:
    shown = ".".join(map(str, path))
    raise BadData(
        Reason.UNSUPPORTED_PARTIAL_UPDATE,
        f"update {what} {shown!r} through a {type(value).__name__} value: "
        "the stored document is not the one MongoDB updated",
    )


def _step(container: Any, c: str | int, path: Path, create: bool) -> Any:
    """The value under one component; with `create`, missing or null becomes a new document."""
    if type(container) is dict:
        key = str(c)
        v = container.get(key, _MISSING)
        if (v is _MISSING or v is None) and create:
            v = container[key] = {}
        return None if v is _MISSING else v
    if type(container) is list:
        i = _index(c)
        if i is None:
            _refuse(path, "reaches", container)
        if i >= len(container):
            if not create:
                return None
            container.extend([None] * (i + 1 - len(container)))
        v = container[i]
        if v is None and create:
            v = container[i] = {}
        return v
    _refuse(path, "reaches", container)
    return None


def _parent(doc: dict[str, Any], path: Path, create: bool) -> Any:
    cur: Any = doc
    for c in path[:-1]:
        cur = _step(cur, c, path, create)
        if cur is None:
            return None
        if type(cur) is not dict and type(cur) is not list:
            if not create:
                return None
            _refuse(path, "reaches", cur)
    return cur


def _get(doc: dict[str, Any], path: Path) -> Any:
    parent = _parent(doc, path, create=False)
    if parent is None:
        return None
    return _step(parent, path[-1], path, False)
