"""``adn.reproduce`` moved to :mod:`adn.studies.reproduce`; this old path works until the next release."""

from .utils.deprecated import alias_module

alias_module(__name__, "adn.studies.reproduce")
