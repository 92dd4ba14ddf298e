"""The names of an archive as a tree of components, and CF-EXTRACT-03 judged on it.

The reader and the writer share this one resolution, so that the writer refuses exactly the
links the reader would refuse: a checkpoint that saved must load.

Names are kept as a trie of components (one node per directory, one entry per member), not as
full path strings: a member ``a/a/.../a/f`` two thousand components deep costs two thousand
small entries, where a set of every parent's full name would cost their lengths' sum, which
grows with the square of the depth. Every resolution walks the trie, one dictionary look-up
per component, and each link's own resolution is computed once and reused whenever another
link passes through it, so judging every link of an archive costs time proportional to the
sum of their targets' lengths.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Generator, Iterator

__all__ = ["MAX_LINK_HOPS", "Dir", "Link", "NameTree", "target_problem"]

MAX_LINK_HOPS = 40  # as Linux's ELOOP bound

_UNSEEN, _BUSY, _DONE = 0, 1, 2
_INSIDE, _OUTSIDE, _LOOP = "inside", "outside", "loop"
_Outcome = tuple[str, "Dir | None", int, int]
_CYCLE: _Outcome = (_LOOP, None, 0, MAX_LINK_HOPS + 1)


class Dir:
    """A directory of the tree: an explicit member or an implied parent."""

    __slots__ = ("children", "parent")

    def __init__(self, parent: Dir | None) -> None:
        self.parent = parent
        self.children: dict[str, Dir | Link | str] = {}


class Link:
    """A symbolic link; ``outcome`` caches its resolution during :meth:`NameTree.problems`."""

    __slots__ = ("name", "outcome", "parent", "state", "target")

    def __init__(self, parent: Dir, name: str, target: str) -> None:
        self.parent = parent
        self.name = name
        self.target = target
        self.state = _UNSEEN
        self.outcome: _Outcome = (_INSIDE, None, 0, 0)


class NameTree:
    """Member names as a trie. Entries are :class:`Dir`, :class:`Link`, or a string naming
    the kind of any other member (``"file"``, ``"hardlink"``)."""

    def __init__(self) -> None:
        self.root = Dir(None)
        self.links: list[Link] = []
        #: directories made by :meth:`parent`, not seen as members before they were
        #: implied (a member of the same name later does not uncount one: CF-LIMIT-01
        #: counts the parents a reader creates)
        self.implied = 0

    def parent(self, parts: list[str]) -> Dir | int:
        """The directory that holds ``parts[-1]``, made (as implied parents) where missing;
        or, when a component on the way is not a directory, its index in ``parts``."""
        node = self.root
        for index in range(len(parts) - 1):
            child = node.children.get(parts[index])
            if child is None:
                child = node.children[parts[index]] = Dir(node)
                self.implied += 1
            elif type(child) is not Dir:
                return index
            node = child
        return node

    def lookup(self, parts: list[str]) -> Dir | Link | str | None:
        """The entry named by ``parts``, without creating anything; None if there is none."""
        node: Dir | Link | str | None = self.root
        for part in parts:
            if type(node) is not Dir:
                return None
            node = node.children.get(part)
        return node

    def add_link(self, parent: Dir, name: str, component: str, target: str) -> None:
        link = parent.children[component] = Link(parent, name, target)
        self.links.append(link)

    def problems(self) -> Iterator[tuple[str, str]]:
        """``(name, why)`` for every link, in the order they were added, that leads outside
        the root or into a loop, judged with every link of the tree known."""
        for link in self.links:
            link.state = _UNSEEN
        for link in self.links:
            kind = _resolve(link)[0]
            what = f"symbolic link target {link.target!r}"
            if kind == _LOOP:
                yield link.name, f"{what} is part of a symbolic link loop"
            elif kind == _OUTSIDE:
                yield link.name, f"{what} points outside the target"


def target_problem(target: str) -> str | None:
    """What is wrong with a link target on its own (CF-EXTRACT-03), before any resolution."""
    if not target or target.startswith("/"):
        return f"symbolic link target {target!r} is not a relative path"
    return None


def _resolve(link: Link) -> _Outcome:
    """Where ``link`` leads: ``(kind, directory, depth below it, hops)``.

    The place is a directory of the tree and a count of components below it that name
    nothing in the tree (taken as plain directories, so no link can lie under them). Hops
    count the link replacements made; for a link that leads outside, those made before it
    got there, so that a caller adds them in the same order a plain resolution would.

    No recursion: the walks in progress are an explicit stack, each one suspended (a
    generator of :func:`_follow`) on the link whose resolution it waits for. Every walk on
    the stack has made one hop into the walk above it, so the bottom one of a stack
    ``MAX_LINK_HOPS + 2`` deep has made more than ``MAX_LINK_HOPS`` however the others
    end: it is a loop, settled there and dropped, and the stack never holds more than
    ``MAX_LINK_HOPS + 1`` walks. (That outcome is exact, not a guess made under a hop
    budget: a walk's hops do not depend on who asked, so it is memoised like any other.)
    Each link is walked once, so a chain of any length costs time linear in its members.
    """
    if link.state == _DONE:
        return link.outcome
    link.state = _BUSY
    stack: deque[tuple[Link, Generator[Link, _Outcome, _Outcome]]] = deque()
    stack.append((link, _follow(link)))
    reply: _Outcome | None = None
    while stack:
        current, walk = stack[-1]
        try:
            child = walk.send(reply)  # type: ignore[arg-type]  # None starts the walk
        except StopIteration as finished:
            current.outcome, current.state = finished.value, _DONE
            stack.pop()
            reply = finished.value
            continue
        if child.state == _DONE:
            reply = child.outcome
        elif child.state == _BUSY:  # reached itself again: a cycle, however many hops
            reply = _CYCLE
        else:
            child.state = _BUSY
            stack.append((child, _follow(child)))
            reply = None
            if len(stack) > MAX_LINK_HOPS + 1:
                bottom, suspended = stack.popleft()
                suspended.close()
                bottom.outcome, bottom.state = _CYCLE, _DONE
    return link.outcome


def _follow(link: Link) -> Generator[Link, _Outcome, _Outcome]:
    """Walk ``link``'s target; yields each link met on the way and is sent its outcome."""
    if link.target.startswith("/"):
        return (_OUTSIDE, None, 0, 0)
    node, below, hops = link.parent, 0, 0
    for part in link.target.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if below:
                below -= 1
            elif node.parent is None:
                return (_OUTSIDE, None, 0, hops)
            else:
                node = node.parent
            continue
        if below:
            below += 1
            continue
        child = node.children.get(part)
        if type(child) is Dir:
            node = child
        elif type(child) is Link:
            hops += 1
            if hops > MAX_LINK_HOPS:
                return (_LOOP, None, 0, hops)
            kind, place, depth, more = yield child
            hops += more
            if kind == _LOOP or hops > MAX_LINK_HOPS:
                return (_LOOP, None, 0, hops)
            if kind == _OUTSIDE:
                return (_OUTSIDE, None, 0, hops)
            assert place is not None
            node, below = place, depth
        else:  # a file, or a name the tree does not hold: a plain component
            below = 1
    return (_INSIDE, node, below, hops)
