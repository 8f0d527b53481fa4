"""Kafka adapters: topic administration and the event producer library."""
