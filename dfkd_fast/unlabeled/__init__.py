"""Distillation from heterogeneous unlabeled collections: relatedness scores under the teacher,
sampling policies over them, and mixing. The training loop is the engine's ``unlabeled`` method:

    collection = Collection.from_specs(["fashion-mnist:DIR", "noise:10000"], (1, 32, 32),
                                       mean=(0.1307,), std=(0.3081,))
    distill(teacher, student, DistillConfig(method="unlabeled", score="energy"),
            (1, 32, 32), collection=collection)
"""

from dfkd_fast.unlabeled.collection import Collection, Source, noise_source, source_from_spec
from dfkd_fast.unlabeled.mixing import mix_batch
from dfkd_fast.unlabeled.sampling import POLICIES, RelatednessSampler
from dfkd_fast.unlabeled.scores import SCORES, ScoredCollection, score_collection

__all__ = [
    "POLICIES",
    "SCORES",
    "Collection",
    "RelatednessSampler",
    "ScoredCollection",
    "Source",
    "mix_batch",
    "noise_source",
    "score_collection",
    "source_from_spec",
]
