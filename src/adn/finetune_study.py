"""``adn.finetune_study`` moved to :mod:`adn.studies.finetune_study`; this old path works until the next release."""

from .utils.deprecated import alias_module

alias_module(__name__, "adn.studies.finetune_study")
