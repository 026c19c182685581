"""MongoDB change events from Kafka into Delta Lake tables, exactly once, with Bytewax."""

__version__ = "0.1.0"
