"""synpo: the SynPO trainer, losses API, data, preference-pair pipeline and CLI."""

__version__ = "0.1.0"

__all__ = ["Trainer", "TrainerConfig", "load_config"]


def __getattr__(name: str):
    # Lazy: `import synpo` (and the CLI's start-up) must not pay for importing torch/transformers.
    if name == "Trainer":
        from synpo.train.loop import Trainer

        return Trainer
    if name in ("TrainerConfig", "load_config"):
        from synpo import config

        return getattr(config, name)
    raise AttributeError(f"module 'synpo' has no attribute {name!r}")
