"""Training: the one loop, its optimizer and schedule, and torchrun support."""
