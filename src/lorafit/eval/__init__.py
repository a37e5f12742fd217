"""Scoring a model: held-out exact match and retention (:mod:`.tasks`), and the metrics of ``lorafit eval``
(:mod:`.report`)."""
