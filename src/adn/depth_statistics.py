"""``adn.depth_statistics`` moved to :mod:`adn.core.depth_statistics`; this old path works until the next release."""

from .utils.deprecated import alias_module

alias_module(__name__, "adn.core.depth_statistics")
