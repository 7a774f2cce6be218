"""Zero-shot risk from the causal LM: sampled futures (path, mc, survival) and the time-to-event head's hazards."""
