"""``adn.data`` moved to :mod:`adn.vision.data`; this old path works until the next release."""

from .utils.deprecated import alias_module

alias_module(__name__, "adn.vision.data")
