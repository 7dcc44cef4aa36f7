"""What ``bitcliff assets`` reports of one embedded asset, whether prepared or not."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class AssetStatus:
    """One embedded asset.

    Attributes:
        name: the name commands accept; aliases: other names for it.
        kind: ``"model"`` or ``"text"``.
        description: one line.
        sources: ``package==version`` strings it is prepared from.
        path: where it is, or will be once prepared; ready: whether it is prepared.
    """

    name: str
    aliases: list[str]
    kind: str
    description: str
    sources: list[str]
    path: str
    ready: bool

    def to_dict(self) -> dict:
        return asdict(self)
