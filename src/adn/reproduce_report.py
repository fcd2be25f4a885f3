"""``adn.reproduce_report`` moved to :mod:`adn.studies.reproduce_report`; this old path works until the next release."""

from .utils.deprecated import alias_module

alias_module(__name__, "adn.studies.reproduce_report")
