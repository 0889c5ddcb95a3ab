"""The drivers behind the thin entry points: set-up, training and evaluation, protocols, extraction, analyses."""
