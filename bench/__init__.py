"""Benchmarks: `python -m bench` measures the pipeline against a hand-written baseline and a floor.

Everything runs on this machine against its own Kafka and MinIO (127.0.0.1,
free ports, a temporary folder), started and stopped by the command. Nothing
here asserts a timing: the numbers are reported, with the targets marked met
or not met.
"""
