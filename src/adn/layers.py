"""``adn.layers`` moved to :mod:`adn.core.layers`; this old path works until the next release."""

from .utils.deprecated import alias_module

alias_module(__name__, "adn.core.layers")
