"""MongoDB change events from Kafka into Delta Lake tables, exactly once, with Bytewax."""

from dataflow.runtime import allocator

__version__ = "0.1.0"

allocator.configure()  # before any module of this package imports deltalake
