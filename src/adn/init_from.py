"""``adn.init_from`` moved to :mod:`adn.vision.init_from`; this old path works until the next release."""

from .utils.deprecated import alias_module

alias_module(__name__, "adn.vision.init_from")
