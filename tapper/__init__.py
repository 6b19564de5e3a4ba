"""tapper: TAP-PER (Temporal Attentive Prefix for PERsonalization)."""

__version__ = "0.1.0"
