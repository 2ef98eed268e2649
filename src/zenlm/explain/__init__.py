"""Seeing inside runs and models: plots now; attention maps and saliency to come."""
