"""``adn.depth_table`` moved to :mod:`adn.deploy.depth_table`; this old path works until the next release."""

from .utils.deprecated import alias_module

alias_module(__name__, "adn.deploy.depth_table")
