"""``adn.memory_data`` moved to :mod:`adn.vision.memory_data`; this old path works until the next release."""

from .utils.deprecated import alias_module

alias_module(__name__, "adn.vision.memory_data")
