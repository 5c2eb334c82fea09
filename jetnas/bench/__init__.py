"""Throughput measurement: cost accounting (`costs`), timed generation (`measure`), `jetnas bench`."""
