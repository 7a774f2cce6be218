"""Data in and out: the simulated cohort, OMOP CDM -> MEDS, readers of MEDS / PRS / labels, prediction files."""
