"""``adn.preprocess`` moved to :mod:`adn.vision.preprocess`; this old path works until the next release."""

from .utils.deprecated import alias_module

alias_module(__name__, "adn.vision.preprocess")
