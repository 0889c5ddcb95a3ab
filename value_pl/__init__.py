"""value-pl: probing pre-trained vision-and-language transformers (VALUE) with PyTorch Lightning."""
from pathlib import Path

#: the Hydra config tree every entry point composes (``configs/`` at the repository root)
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")
