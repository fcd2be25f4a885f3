"""``adn.distributed`` moved to :mod:`adn.training.distributed`; this old path works until the next release."""

from .utils.deprecated import alias_module

alias_module(__name__, "adn.training.distributed")
