"""One LightningModule per algorithm; all share :class:`~lit_meta.algorithms.base.MetaLearner`."""

from lit_meta.algorithms.base import MetaLearner
from lit_meta.algorithms.maml import MAML

__all__ = ["MAML", "MetaLearner"]
