"""Recommenders: GRACE (encoder–decoder with JSA), GRAM (lexical IDs, late fusion) and the SASRec baseline."""
from .grace import GRACE, DecoderCache, GRACEConfig, Memory, recommend, shift_right
from .gram import GRAM, GRAMConfig, ItemEncodingCache
from .layers import linear_cross_entropy, sequence_loss
from .sasrec import SASRec, SASRecConfig

__all__ = ["GRACE", "GRACEConfig", "GRAM", "GRAMConfig", "ItemEncodingCache", "DecoderCache", "Memory", "SASRec",
           "SASRecConfig", "linear_cross_entropy", "recommend", "sequence_loss", "shift_right"]
