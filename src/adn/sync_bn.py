"""``adn.sync_bn`` moved to :mod:`adn.core.sync_bn`; this old path works until the next release."""

from .utils.deprecated import alias_module

alias_module(__name__, "adn.core.sync_bn")
