"""synpo: the SynPO trainer, losses API, data, preference-pair pipeline and CLI."""

__version__ = "0.1.0"
