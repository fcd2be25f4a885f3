"""``adn.network`` moved to :mod:`adn.core.network`; this old path works until the next release."""

from .utils.deprecated import alias_module

alias_module(__name__, "adn.core.network")
