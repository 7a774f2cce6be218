"""MEDS events -> token sequences, and the HF tokenizer that saves with the model."""
