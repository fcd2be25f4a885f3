"""``adn.jsonout`` moved to :mod:`adn.utils.jsonout`; this old path works until the next release."""

from .utils.deprecated import alias_module

alias_module(__name__, "adn.utils.jsonout")
