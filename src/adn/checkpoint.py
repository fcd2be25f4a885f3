"""``adn.checkpoint`` was split into :mod:`adn.errors`, :mod:`adn.training.run_folder`,
:mod:`adn.utils.checkpoint_file`, :mod:`adn.vision.checkpoint`; its names are read from there until the next
release."""

from .utils.deprecated import moved_names

__getattr__ = moved_names(
    __name__,
    {
        "CheckpointError": "adn.errors",
        "FORMAT": "adn.utils.checkpoint_file",
        "LATEST": "adn.utils.checkpoint_file",
        "MODEL_KWARGS": "adn.vision.checkpoint",
        "NUMBERED": "adn.utils.checkpoint_file",
        "TRAINING_METHODS": "adn.vision.checkpoint",
        "atomic_save": "adn.utils.checkpoint_file",
        "build_network": "adn.vision.checkpoint",
        "check_finite": "adn.utils.checkpoint_file",
        "check_integrity": "adn.utils.checkpoint_file",
        "checkpoint_payload": "adn.utils.checkpoint_file",
        "first_line": "adn.errors",
        "is_state_dict": "adn.utils.checkpoint_file",
        "load": "adn.vision.checkpoint",
        "load_checkpoint": "adn.utils.checkpoint_file",
        "load_network": "adn.vision.checkpoint",
        "load_weights": "adn.vision.checkpoint",
        "load_weights_only": "adn.utils.checkpoint_file",
        "numbered_checkpoints": "adn.utils.checkpoint_file",
        "numbered_name": "adn.utils.checkpoint_file",
        "remove_stale_temporaries": "adn.training.run_folder",
        "save_checkpoint": "adn.utils.checkpoint_file",
        "save_rotating": "adn.training.run_folder",
        "validate_meta": "adn.vision.checkpoint",
    },
)
