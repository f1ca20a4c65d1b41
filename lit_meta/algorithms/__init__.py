"""One LightningModule per algorithm; all share :class:`~lit_meta.algorithms.base.MetaLearner`."""

from lit_meta.algorithms.anil import ANIL
from lit_meta.algorithms.base import MetaLearner
from lit_meta.algorithms.imaml import IMAML
from lit_meta.algorithms.maml import MAML
from lit_meta.algorithms.matchingnet import MatchingNet
from lit_meta.algorithms.metabaseline import MetaBaseline
from lit_meta.algorithms.metabgd import MetaBGD
from lit_meta.algorithms.metasgd import MetaSGD
from lit_meta.algorithms.pretrain import Pretrain
from lit_meta.algorithms.protonet import ProtoNet
from lit_meta.algorithms.reptile import Reptile

__all__ = [
    "ANIL", "IMAML", "MAML", "MatchingNet", "MetaBaseline", "MetaBGD", "MetaLearner", "MetaSGD", "Pretrain", "ProtoNet",
    "Reptile",
]
