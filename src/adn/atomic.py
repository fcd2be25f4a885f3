"""``adn.atomic`` moved to :mod:`adn.utils.atomic`; this old path works until the next release."""

from .utils.deprecated import alias_module

alias_module(__name__, "adn.utils.atomic")
