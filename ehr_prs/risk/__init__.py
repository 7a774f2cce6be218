"""Zero-shot risk from the causal LM: sampled futures (path, mc, survival) and the time-to-event head's hazards.

    sampling.py       the sampling engine: K futures per prompt, the path / mc / survival estimators,
                      control variates, the incidence refit's shift
    shared_prompt.py  the KV cache those K paths share (one copy of each prompt) and its attention kernel,
                      behind the model's AttendingCacheLayer interface
    hazard.py         the hazard route: the time-to-event head's risk curve from one forward pass
    command.py        `ehr-prs risk`

Importing this package (or command.py) imports no torch, so `ehr-prs risk --help` answers at once.
"""

SAMPLING_METHODS = ("path", "mc", "survival")  # estimators from sampled futures (sampling.py)
METHODS = (*SAMPLING_METHODS, "hazard")  # what `ehr-prs risk --method` accepts; hazard: the TTE head (hazard.py)
