"""``adn.skip`` moved to :mod:`adn.core.skip`; this old path works until the next release."""

from .utils.deprecated import alias_module

alias_module(__name__, "adn.core.skip")
