"""Probing protocols beyond plain training: control tasks, MDL online code, the SentEval protocol."""
