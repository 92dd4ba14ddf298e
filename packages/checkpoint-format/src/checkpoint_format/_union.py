"""The union of several contributors' trees, and who writes what of it (spec CF-ASM-07).

Deterministic: the plan depends only on the manifests' names, kinds, contents and metadata,
never on fingerprints or the order work happened to finish in, so every contributor that
plans from the same manifests gets the same plan.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from ._errors import UnionConflictError
from ._links import NameTree
from ._scan import DIR, FILE, HARDLINK, SYMLINK, ManifestEntry, TreeManifest

__all__ = ["UnionPlan", "plan_union", "preorder_key"]


@dataclasses.dataclass(frozen=True)
class UnionPlan:
    """Who writes what of an assembled object. Picklable, to be broadcast.

    ``directories``: the union's directory names in pre-order, written by the head
    (CF-ASM-02), with ``directory_entries`` their metadata (the lowest contributor's).
    ``assigned[i]``: the names contributor ``i`` writes in its segment (CF-ASM-03), in its
    tree's pre-order; empty for a contributor with nothing (no tree, an empty tree, or only
    what lower contributors write). ``shared``: the non-directory names held identically by
    several contributors, with those contributors (written once, by the first). ``empty``:
    the union has no member at all; the object is the end piece alone (CF-ASM-05).
    """

    directories: tuple[str, ...]
    directory_entries: tuple[ManifestEntry, ...]
    assigned: tuple[tuple[str, ...], ...]
    shared: tuple[tuple[str, tuple[int, ...]], ...]
    empty: bool

    @property
    def members(self) -> int:
        """How many members the object holds."""
        return len(self.directories) + sum(map(len, self.assigned))


def preorder_key(name: str) -> tuple[bytes, ...]:
    """Sort key of depth-first pre-order with siblings by UTF-8 bytes (CF-WRITE-04)."""
    return tuple(part.encode("utf-8") for part in name.split("/"))


def plan_union(manifests: Sequence[TreeManifest | None]) -> UnionPlan:
    """Join the contributors' trees, ``manifests[i]`` being contributor ``i``'s (``None``: it
    has nothing), under CF-ASM-07.

    Directories are merged (the lowest contributor's metadata); identical non-directory
    entries are written once, by the lowest contributor holding them. Raises
    :class:`UnionConflictError` naming the path, the contributors and why, for anything else
    held by several: different content or permission bits, a directory here and a file or
    link there, and for symbolic links that leave the root or loop once the trees are joined.
    """
    first: dict[str, tuple[int, ManifestEntry]] = {}
    holders: dict[str, list[int]] = {}
    for rank, manifest in enumerate(manifests):
        if manifest is None:
            continue
        for entry in manifest.entries:
            seen = first.get(entry.name)
            if seen is None:
                first[entry.name] = (rank, entry)
                holders[entry.name] = [rank]
                continue
            if holders[entry.name][-1] == rank:
                raise UnionConflictError(
                    entry.name, (rank,), f"rank {rank}'s manifest lists the name twice"
                )
            why = _difference(seen[1], entry)
            if why is not None:
                raise UnionConflictError(
                    entry.name, (seen[0], rank),
                    f"rank {seen[0]} and rank {rank} hold different entries under this path:"
                    f" {why}",
                )
            holders[entry.name].append(rank)
    _check_parents(first, holders)
    _check_links(first, holders)
    directories = sorted((n for n, (_r, e) in first.items() if e.kind == DIR), key=preorder_key)
    assigned: list[tuple[str, ...]] = []
    for rank, manifest in enumerate(manifests):
        names: list[str] = []
        if manifest is not None:
            for entry in manifest.entries:
                if entry.kind != DIR and first[entry.name][0] == rank:
                    names.append(entry.name)
        assigned.append(tuple(names))
    _check_hard_links(first, assigned)
    shared = tuple(
        (name, tuple(ranks))
        for name, ranks in holders.items()
        if len(ranks) > 1 and first[name][1].kind != DIR
    )
    return UnionPlan(
        directories=tuple(directories),
        directory_entries=tuple(first[name][1] for name in directories),
        assigned=tuple(assigned),
        shared=shared,
        empty=not first,
    )


def _content(entry: ManifestEntry) -> tuple:
    """What makes two non-directory entries identical (CF-ASM-07): the kind (a hard link
    counts as the file it links to), the permission bits and the content."""
    if entry.kind == SYMLINK:
        return (SYMLINK, entry.mode, entry.link)
    return (FILE, entry.mode, entry.size, entry.digest_key, entry.digest)


def _difference(kept: ManifestEntry, other: ManifestEntry) -> str | None:
    if kept.kind == DIR and other.kind == DIR:
        return None
    if DIR in (kept.kind, other.kind):
        return f"a {_what(kept)} and a {_what(other)}"
    if _content(kept) == _content(other):
        return None
    if SYMLINK in (kept.kind, other.kind):
        if kept.kind == other.kind:
            return f"symbolic links to {kept.link!r} and to {other.link!r}"
        return f"a {_what(kept)} and a {_what(other)}"
    if kept.mode != other.mode:
        return f"files with modes {kept.mode:o} and {other.mode:o}"
    if kept.size != other.size:
        return f"files of {kept.size} and {other.size} bytes"
    return "files of the same size with different contents (their SHA-256 digests differ)"


def _what(entry: ManifestEntry) -> str:
    return {DIR: "directory", FILE: "file", SYMLINK: "symbolic link", HARDLINK: "hard link"}[
        entry.kind
    ]


def _check_parents(
    first: dict[str, tuple[int, ManifestEntry]], holders: dict[str, list[int]]
) -> None:
    """CF-EXTRACT-08 on the union: nothing lies below a file or link of another rank, and
    every parent is a directory of the union, which the head then holds (CF-ASM-02)."""
    for name, (rank, _entry) in first.items():
        parent = name.rpartition("/")[0]
        if not parent:
            continue
        above = first.get(parent)
        if above is None:
            raise UnionConflictError(
                name, (rank,), f"its parent directory {parent!r} is in no rank's tree"
            )
        if above[1].kind != DIR:
            raise UnionConflictError(
                name, tuple(sorted({rank, *holders[parent]})),
                f"lies below {parent!r}, a {_what(above[1])} in rank {above[0]}"
                " (CF-EXTRACT-08)",
            )


def _check_links(
    first: dict[str, tuple[int, ManifestEntry]], holders: dict[str, list[int]]
) -> None:
    """CF-EXTRACT-03 on the union: each tree's links were judged alone (CF-WRITE-05), but a
    link of one rank may pass through a link of another."""
    tree = NameTree()
    for name in sorted(first, key=preorder_key):
        entry = first[name][1]
        if entry.kind != SYMLINK:
            continue
        parts = name.split("/")
        parent = tree.parent(parts)
        if isinstance(parent, int):  # pragma: no cover - a link below a link is a conflict
            continue
        assert entry.link is not None
        tree.add_link(parent, name, parts[-1], entry.link)
    for name, problem in tree.problems():
        raise UnionConflictError(
            name, tuple(holders[name]),
            f"{problem} once the ranks' trees are joined (CF-EXTRACT-03)",
        )


def _check_hard_links(
    first: dict[str, tuple[int, ManifestEntry]], assigned: list[tuple[str, ...]]
) -> None:
    """CF-ASM-04: every hard link written names a member written before it. Manifests from
    :func:`scan_tree` always pass (a link's target is the first name of its inode, in the
    same tree, so the lowest holder of that content is this rank or a lower one); this
    refuses hand-made manifests that would publish an object readers refuse."""
    for rank, names in enumerate(assigned):
        position = {name: index for index, name in enumerate(names)}
        for index, name in enumerate(names):
            entry = first[name][1]
            if entry.kind != HARDLINK:
                continue
            target = first.get(entry.link or "")
            ok = (
                target is not None
                and target[1].kind in (FILE, HARDLINK)
                and (target[0] < rank or position.get(entry.link, index) < index)
            )
            if not ok:
                raise UnionConflictError(
                    name, (rank,),
                    f"hard link to {entry.link!r}, which no member before it in the object"
                    " holds (CF-ASM-04)",
                )
