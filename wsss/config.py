"""A stage's config: the flags that decide its artifacts, and how two configs compare.

A stage folder records its config (`stage.json`, `wsss.stage`), and a rerun whose config differs
stops before it touches anything. What goes in, and what counts as a difference:

- **Kinds.** Flags declared runtime or test-time (`wsss.run.runtime`, `test_time`) decide how a
  stage runs or where its predictions go, never what it makes: they are no config.
- **Sections.** Flags added by `add_section(parser, name, add_args)` belong to section `name`
  (stage 3: one per method, `wsss.methods`). A stage that names its sections records only theirs
  and the flags of no section: a PSL run's config holds no --stc-* flag, so changing one leaves a
  finished PSL run valid, and adding a flag to one method changes no other method's config.
- **Defaults.** A flag the recorded config lacks was added after the run was made: the run was
  made as the flag's declared default (the default in its definition, not a preset's) behaves,
  so the flag at that default is no change, any other value is one. A recorded flag the new config
  leaves out (another section's, or a flag declared runtime since) is no change either.
- **Paths.** A path spelled another way (./data/x, data/x/, /abs/data/x) is the same value.

The parser (`wsss.run.Parser`) puts each flag's kind, section and declared default on the parsed
namespace (`_kinds`, `_sections`, `_defaults`), so the flags' own definitions decide all of this.
"""
from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Iterable


def as_json(values: dict) -> dict:
    """`values` as they read back from JSON (tuples as lists, paths as strings)."""
    return json.loads(json.dumps(values, default=str))


def add_section(parser: argparse.ArgumentParser, name: str, add_args: Callable[[argparse.ArgumentParser], None]):
    """Add the flags of `add_args(parser)` as section `name`."""
    before = len(parser._actions)
    add_args(parser)
    for action in parser._actions[before:]:
        action.section = name


def declared_defaults(parser: argparse.ArgumentParser) -> dict:
    """{dest: the default in the flag's definition}; the first call records them on the actions, so
    the defaults a preset sets later (`parser.set_defaults`) do not replace them."""
    found = {}
    for action in parser._actions:
        if not hasattr(action, "declared_default"):
            default = action.default
            if isinstance(default, str) and action.type is not None:  # argparse converts such a default too
                try:
                    default = parser._get_value(action, default)
                except argparse.ArgumentError:
                    pass
            action.declared_default = default
        if action.dest is not argparse.SUPPRESS and action.default is not argparse.SUPPRESS:
            found[action.dest] = action.declared_default
    return found


def flags(args) -> dict:
    """Every flag of a run, as it reads back from JSON."""
    return as_json({k: v for k, v in sorted(vars(args).items()) if not k.startswith("_")})


def artifact_config(args, sections: Iterable[str] | None = None) -> dict:
    """The flags that decide a stage's artifacts: all but those declared runtime or test-time, and
    with `sections`, but those of the other sections."""
    kinds = getattr(args, "_kinds", {})
    of = getattr(args, "_sections", {})
    keep = None if sections is None else set(sections)
    return {k: v for k, v in flags(args).items()
            if k not in kinds and (keep is None or of.get(k) is None or of[k] in keep)}


def same_value(old, new) -> bool:
    """Config values agree: equal, or the same existing path spelled another way (./data/x, data/x/,
    /abs/data/x), so that respelling a path is no config change."""
    if old == new:
        return True
    if isinstance(old, str) and isinstance(new, str) and old and new and os.path.exists(new):
        return os.path.abspath(old) == os.path.abspath(new)
    return False


UNSET = "(unset)"


def differences(old: dict, new: dict, defaults: dict | None = None, left_out: Iterable[str] = ()) -> list[str]:
    """The flags whose recorded value `old` and new value `new` differ, one line each (old -> new).

    `defaults` {flag: declared default}: a flag `old` lacks is no change at its default;
    `left_out`: flags the new config leaves out on purpose (another section's, runtime), whose
    recorded values are no change."""
    defaults = as_json(defaults or {})
    skip = set(left_out) - set(new)
    lines = []
    for k in sorted(set(old) | set(new)):
        if k in skip:
            continue
        if k not in old and k in new and k in defaults and same_value(defaults[k], new[k]):
            continue
        if not same_value(old.get(k), new.get(k)):
            lines.append(f"  --{k.replace('_', '-')}: {old.get(k, UNSET)} -> {new.get(k, UNSET)}")
    return lines


def compare(args, old: dict, sections: Iterable[str] | None = None) -> tuple[dict, list[str]]:
    """(the config of `args`, its differences from the recorded `old`): see the module docstring."""
    config = artifact_config(args, sections)
    left_out = set(flags(args)) - set(config)
    return config, differences(old, config, getattr(args, "_defaults", {}), left_out)
