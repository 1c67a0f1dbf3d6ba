"""The study's experiments, each composed from the public layers below (model, probing, interventions)."""
