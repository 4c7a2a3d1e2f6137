from .strategies import ClaspPE, Diversity, First, Handouts, Hybrid, RandomChoice, Typicality, Uncertainty
