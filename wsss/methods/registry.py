"""The table of stage-3 methods: `METHODS[name]` is a `Method`, added by `@register` (the way timm and
segmentation_models_pytorch register their models), so a misspelt key or a missing entry point is an
error where the method is registered, not when stage 3 first looks it up.

A dict entry in the older form (`{"train": ..., "reads": ..., "folders": ..., "args": ...}`),
assigned to `METHODS[name]` or passed to `METHODS.update`, becomes a `Method` the same way.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from dataclasses import dataclass

READS = ("pseudo", "masks")  # stage 2's artifacts, or the training split's ground-truth masks


@dataclass(frozen=True)
class Method:
    """One stage-3 method (the contract is the docstring of `wsss.methods`).

    `train(ctx) -> str`: trains its nets with `ctx.train_net`, returns the final net's folder;
    `reads`: one of `READS`; `folders`: the top-level folders it writes inside the stage folder;
    `args(parser)`: its own flags, named --NAME-..., or None."""

    name: str
    train: Callable[..., str]
    reads: str
    folders: tuple[str, ...]
    args: Callable[[argparse.ArgumentParser], None] | None = None

    def __post_init__(self):
        if not callable(self.train):
            raise TypeError(f"method {self.name!r}: train must be a function train(ctx) -> str")
        if self.reads not in READS:
            raise ValueError(f"method {self.name!r}: reads must be one of {', '.join(READS)}, not {self.reads!r}")
        if isinstance(self.folders, str):
            raise TypeError(f"method {self.name!r}: folders is a tuple of folder names, not the string "
                            f"{self.folders!r}")
        object.__setattr__(self, "folders", tuple(self.folders))
        if self.args is not None and not callable(self.args):
            raise TypeError(f"method {self.name!r}: args must be a function add_args(parser) or None")


def as_method(name: str, entry: Method | dict) -> Method:
    """`entry` as a Method named `name` (a dict entry of the older form is converted)."""
    if isinstance(entry, Method):
        return entry
    if not isinstance(entry, dict):
        raise TypeError(f"method {name!r}: a Method (wsss.methods.registry.register), not {type(entry).__name__}")
    unknown = sorted(set(entry) - {"train", "reads", "folders", "args"})
    if unknown:
        raise ValueError(f"method {name!r}: unknown keys {', '.join(unknown)} (train, reads, folders, args)")
    return Method(name, entry["train"], entry["reads"], entry["folders"], entry.get("args"))


class MethodTable(dict):
    """name -> Method; what is put in becomes a Method (`as_method`)."""

    def __setitem__(self, name: str, entry: Method | dict) -> None:
        super().__setitem__(name, as_method(name, entry))

    def update(self, other=(), **more) -> None:
        for name, entry in dict(other, **more).items():
            self[name] = entry

    def setdefault(self, name: str, entry: Method | dict):
        if name not in self:
            self[name] = entry
        return self[name]


METHODS: dict[str, Method] = MethodTable()


def register(name: str, *, reads: str, folders: Iterable[str], args=None):
    """Decorator: `@register("mine", reads="pseudo", folders=("mine",))` over `def train(ctx)` adds
    the method `mine` to `METHODS` (a later registration of the same name replaces it)."""
    def decorate(train: Callable[..., str]) -> Callable[..., str]:
        METHODS[name] = Method(name, train, reads, tuple(folders), args)
        return train

    return decorate
