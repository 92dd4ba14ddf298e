"""CF-EXTRACT-03: where a symbolic link leads, judged on names alone.

The reader and the writer share this one resolution, so that the writer refuses exactly the
links the reader would refuse: a checkpoint that saved must load.
"""

from __future__ import annotations

__all__ = ["MAX_LINK_HOPS", "link_problem"]

MAX_LINK_HOPS = 40  # as Linux's ELOOP bound


class _Loop(Exception):
    pass


def link_problem(name: str, target: str, links: dict[str, str]) -> str | None:
    """Why the link ``name -> target`` is refused, or None when it stays inside the root.

    ``links`` maps the names of the archive's symbolic links to their targets; links met
    while resolving are followed. Names never seen are taken as plain directories or files.
    """
    if not target or target.startswith("/"):
        return f"symbolic link target {target!r} is not a relative path"
    try:
        inside = _resolve(name.split("/")[:-1], target.split("/"), links, [0])
    except _Loop:
        return f"symbolic link target {target!r} is part of a symbolic link loop"
    if inside is None:
        return f"symbolic link target {target!r} points outside the target"
    return None


def _resolve(
    stack: list[str], components: list[str], links: dict[str, str], hops: list[int]
) -> list[str] | None:
    """The resolved path as components, or None if it climbs above the root."""
    stack = list(stack)
    for part in components:
        if part in ("", "."):
            continue
        if part == "..":
            if not stack:
                return None
            stack.pop()
            continue
        link = links.get("/".join([*stack, part]))
        if link is None:
            stack.append(part)
            continue
        hops[0] += 1
        if hops[0] > MAX_LINK_HOPS:
            raise _Loop
        if link.startswith("/"):
            return None
        resolved = _resolve(stack, link.split("/"), links, hops)
        if resolved is None:
            return None
        stack = resolved
    return stack
