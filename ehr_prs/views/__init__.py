"""Views for a person and a cohort: the patient page and the genomic what-if."""
