from .volume_scores import EmbeddingScoring, UncertaintyScoring
