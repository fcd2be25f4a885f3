"""``adn.profile`` moved to :mod:`adn.runtime.profile`; this old path works until the next release."""

from .utils.deprecated import alias_module

alias_module(__name__, "adn.runtime.profile")
