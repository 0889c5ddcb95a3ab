"""Compare checkpoints of one backbone family with a fixed probe suite (``python -m value_pl.compare``)."""
from .checkpoints import Checkpoint, checksum, discover, step_from_name


def compare(cfg):
    from .driver import compare as _compare

    return _compare(cfg)


__all__ = ["Checkpoint", "checksum", "discover", "step_from_name", "compare"]
