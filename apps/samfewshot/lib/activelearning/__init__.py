from .strategies import Diversity, First, Handouts, Hybrid, RandomChoice, Uncertainty
