"""How a pipeline runs: Ray start-up, resource plan, fusion, object-store budget, progress, commit loop."""
