"""Recommenders: GRACE (encoder–decoder with JSA) and the SASRec baseline."""
from .grace import GRACE, DecoderCache, GRACEConfig, Memory, recommend, shift_right
from .layers import sequence_loss
from .sasrec import SASRec, SASRecConfig

__all__ = ["GRACE", "GRACEConfig", "DecoderCache", "Memory", "SASRec", "SASRecConfig", "recommend", "sequence_loss",
           "shift_right"]
