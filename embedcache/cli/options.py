"""Command-line options built from the config fields they fill (:func:`embedcache.config.setting`): a default, a
choice list, a flag or a help text is written once, in the config, and the command, the config's checks, their
messages and the manual cannot disagree."""

from __future__ import annotations

from dataclasses import MISSING, fields
from pathlib import Path

import click


def field_of(cls, name: str):
    return next(f for f in fields(cls) if f.name == name)


def option(cls, name: str, *short: str, **overrides):
    """The click option that fills field ``name`` of the config class ``cls``, its parameter named as the field.
    ``short``: extra spellings (``-o``); ``overrides``: click keywords the field cannot say (rare)."""
    f = field_of(cls, name)
    meta, default = f.metadata, f.default
    if "help" not in meta or default is MISSING:
        raise TypeError(f"{cls.__name__}.{name} is not a setting (embedcache.config.setting)")
    flag = meta["flag"] or "--" + name.replace("_", "-")
    kwargs: dict = {"default": default, "help": meta["help"], "show_default": default is not None}
    declarations = [flag, *short]
    if isinstance(default, bool):
        if default:
            declarations = [f"{flag}/--no-{flag[2:]}", *short]
        else:
            kwargs.update(is_flag=True, show_default=False)
    elif meta["choices"] is not None:
        kwargs["type"] = click.Choice(list(meta["choices"]))
    elif meta["cli_range"] is not None:
        low, high = meta["cli_range"]
        kwargs["type"] = click.IntRange(low, high) if isinstance(default, int) else click.FloatRange(low, high)
    elif meta["path"]:
        kwargs["type"] = click.Path(path_type=Path)
    elif default is not None:
        kwargs["type"] = type(default)
    return click.option(*declarations, name, **{**kwargs, **overrides})


def options(cls, *names: str):
    """:func:`option` for each of ``names``, in that order on the command's help."""
    def decorate(func):
        for name in reversed(names):
            func = option(cls, name)(func)
        return func

    return decorate


def typed(ctx: click.Context | None = None) -> frozenset[str]:
    """The parameters whose options were typed on the command line (not defaults or the environment): the one
    place every command asks it."""
    ctx = ctx or click.get_current_context()
    return frozenset(name for name in ctx.params
                     if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE)
