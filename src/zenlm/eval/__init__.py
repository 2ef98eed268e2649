"""Evaluation: perplexity and bits-per-byte now; classification and multiple choice to come."""
