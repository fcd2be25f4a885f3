"""``adn.predict`` moved to :mod:`adn.deploy.predict`; this old path works until the next release."""

from .utils.deprecated import alias_module

alias_module(__name__, "adn.deploy.predict")
