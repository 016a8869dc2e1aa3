"""The paper's experiments (phase transition, batch size, biased tasks, model size)."""
