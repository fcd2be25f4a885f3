"""``adn.authors`` moved to :mod:`adn.vision.authors`; this old path works until the next release."""

from .utils.deprecated import alias_module

alias_module(__name__, "adn.vision.authors")
