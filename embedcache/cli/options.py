"""Command-line options built from the config fields they fill (:func:`embedcache.config.setting`): a default, a
choice list, a flag or a help text is written once, in the config, and the command, the config's checks, their
messages and the manual cannot disagree."""

from __future__ import annotations

import functools
from dataclasses import MISSING, fields
from pathlib import Path

import click

#: Joins a field's name and an old spelling in the parameter name of that spelling's hidden option.
_RENAMED = "__renamed_from_"


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
    if isinstance(default, tuple):  # a comma list, checked against its choices by the config
        kwargs.update(default=",".join(map(str, default)), show_default=bool(default), callback=comma_list,
                      metavar="A,B,...")
    elif isinstance(default, bool):
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
    made = click.option(*declarations, name, **{**kwargs, **overrides})
    if not meta.get("renamed_from"):
        return made
    return lambda func: old_spellings(name, flag, meta["renamed_from"], type=kwargs.get("type"),
                                      callback=kwargs.get("callback"))(made(func))


def old_spellings(name: str, flag: str, olds: tuple[str, ...], *, type=None, callback=None):
    """Keep taking the old spellings ``olds`` of the option ``flag`` (which fills parameter ``name``) for a release:
    each a hidden option whose value, typed, fills ``name`` with a note on stderr. Put it above the option."""
    spelled = {name + _RENAMED + old[2:].replace("-", "_"): old for old in olds}  # parameter → old flag

    def decorate(func):
        for param, old in spelled.items():  # hidden: --help shows the one name
            func = click.option(old, param, default=None, hidden=True, type=type, callback=callback)(func)
        return _take_old_spellings(func, name, flag, spelled)

    return decorate


def _take_old_spellings(func, name: str, flag: str, spelled: dict[str, str]):
    """``func`` taking a value typed under an old spelling of ``name``'s option (``spelled``: its parameter → the old
    flag) as if typed under ``flag``, with a note on stderr; both spellings at once are a usage error."""
    @functools.wraps(func)
    def command(*args, **kwargs):
        for param, old in spelled.items():
            value = kwargs.pop(param)
            if value is None:
                continue
            ctx = click.get_current_context()
            if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE:
                raise click.UsageError(f"{old} is the old spelling of {flag}; give one of them")
            click.echo(f"note: {old} is now {flag}; the old spelling goes in a later release", err=True)
            kwargs[name] = value
        return func(*args, **kwargs)

    return command


def comma_list(ctx, param, value: str | None) -> tuple[str, ...] | None:
    """``"a, b,,c"`` → ``("a", "b", "c")``: the value of an option whose field holds a tuple."""
    if value is None:
        return None
    return tuple(part.strip() for part in value.split(",") if part.strip())


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
    return frozenset(name.split(_RENAMED)[0] for name in ctx.params  # an old spelling types its field
                     if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE)
