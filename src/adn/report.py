"""``adn.report`` moved to :mod:`adn.deploy.report`; this old path works until the next release."""

from .utils.deprecated import alias_module

alias_module(__name__, "adn.deploy.report")
