"""Joint image–report generation by masked discrete diffusion over MedITok tokens (MeDiM-style).

model.py: the bidirectional AdaLN transformer; masking.py: schedules, forward masking, ELBO loss;
sampler.py: iterative unmasking; train.py: the trainer CLI. See docs/diffusion.md.
"""
