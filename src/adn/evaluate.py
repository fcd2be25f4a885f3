"""``adn.evaluate`` moved to :mod:`adn.vision.evaluate`; this old path works until the next release."""

from .utils.deprecated import alias_module

alias_module(__name__, "adn.vision.evaluate")
