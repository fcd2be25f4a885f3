"""``adn.finetune_report`` moved to :mod:`adn.studies.finetune_report`; this old path works until the next release."""

from .utils.deprecated import alias_module

alias_module(__name__, "adn.studies.finetune_report")
