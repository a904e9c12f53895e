"""How ``--help`` reads: placeholders that name the thing, no type names on flags.

Typer shows every parameter's Python type (``<str>``, ``<bool>``, ``<int range>``) and
wraps required arguments in braces (``{model}``). quantcli's commands and its group use
the classes below instead: an argument shows its metavar (``MODEL``), an option its metavar
or choices, a flag nothing but its name. They rely on typer 0.29's parameter classes (its
vendored click), hence the pin in pyproject.toml; the help tests show when that breaks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

if TYPE_CHECKING:
    from typer._click import Context, Parameter


class _Argument(TyperArgument):
    def display_type_rich(self, ctx: Context) -> str | None:
        return None

    def _usage_display_name(self) -> str:
        name = self.display_name_raw if self.required else f"[{self.display_name_raw}]"
        return name + ("..." if self.nargs != 1 else "")


class _Flag(TyperOption):
    def display_type_rich(self, ctx: Context) -> str | None:
        return None


def _plain(params: list[Parameter]) -> list[Parameter]:
    for param in params:
        if isinstance(param, TyperArgument):
            param.__class__ = _Argument
            param.metavar = param.metavar or param.name.upper()
        elif isinstance(param, TyperOption) and param.is_flag:
            param.__class__ = _Flag
        elif isinstance(param, TyperOption) and param.metavar is None:
            param.metavar = _placeholder(param)
    return params


def _placeholder(option: TyperOption) -> str:
    """Its choices (``8|4|2``), or its name in capitals (``--group-size GROUP_SIZE``)."""
    if option.type_descriptor.is_choice:
        return "|".join(str(getattr(c, "value", c)) for c in option.type_descriptor.choices)
    return option.name.upper()


class Command(TyperCommand):
    """A quantcli command: its help shows placeholders, not Python types."""

    def get_params(self, ctx: Context) -> list[Parameter]:
        return _plain(super().get_params(ctx))


class Group(TyperGroup):
    """The quantcli group, with the same help conventions as its commands."""

    def get_params(self, ctx: Context) -> list[Parameter]:
        return _plain(super().get_params(ctx))
