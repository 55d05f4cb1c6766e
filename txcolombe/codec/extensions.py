"""The ESMTP extensions a server advertises in its EHLO reply (RFC 5321 §4.1.1.1)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from txcolombe.codec.reply import Reply


@dataclass(frozen=True)
class Extensions(Mapping[str, tuple[str, ...]]):
    """Keyword (upper case) to parameters, e.g. ``{"SIZE": ("10240000",)}``.

    :ivar server_name: the domain the server gave in the first line.
    """

    server_name: str = ""
    _items: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def from_reply(cls, reply: Reply) -> Extensions:
        """Parse a 250 reply to EHLO."""
        first, *rest = reply.lines
        items: dict[str, tuple[str, ...]] = {}
        for line in rest:
            words = line.split()
            if words:
                items[words[0].upper()] = tuple(words[1:])
        # Some servers still write "AUTH=LOGIN PLAIN"; read it as AUTH too.
        legacy = [k for k in items if k.startswith("AUTH=")]
        if "AUTH" not in items and legacy:
            items["AUTH"] = (legacy[0][5:], *items[legacy[0]])
        server = first.split()[0] if first.split() else ""
        return cls(server, items)

    def __getitem__(self, key: str) -> tuple[str, ...]:
        return self._items[key.upper()]

    def __contains__(self, key: object) -> bool:
        # Asked in upper case, as the client asks: no new string to make.
        return isinstance(key, str) and (key in self._items or key.upper() in self._items)

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def size(self) -> int | None:
        """The SIZE limit in octets; None if not advertised or unlimited (0)."""
        params = self._items.get("SIZE")
        if not params or not params[0].isdigit() or int(params[0]) == 0:
            return None
        return int(params[0])

    @property
    def auth_mechanisms(self) -> frozenset[str]:
        """The SASL mechanisms offered, upper case."""
        return frozenset(m.upper() for m in self._items.get("AUTH", ()))

    def __repr__(self) -> str:
        shown = ", ".join(" ".join((k, *v)) for k, v in self._items.items())
        return f"Extensions({self.server_name!r}: {shown})"
