"""spntune: hyperparameter search for refined (CSPN / DySPN) semantic segmentation."""

__version__ = "0.1.0"
