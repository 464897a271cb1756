"""Vocabulary: one disjoint range of token ids per slot, so a token id alone says what it is.

Slots in id order: `special` (PAD=0, BOS=1, EOS=2), `behavior`, `product_type`, `price_band`,
`brand` (index 0 of each CoT slot is its UNK), `sid_1` ... `sid_k`, `collision`.
"""
import torch

SPECIAL_TOKENS = ("PAD", "BOS", "EOS")
PAD, BOS, EOS = 0, 1, 2
COT_SLOTS = ("product_type", "price_band", "brand")
UNK = 0  # index of the UNK token inside each CoT slot


class Vocabulary:
    """Token ids of slot `s` are `offset(s) + index`, for index in `range(size(s))`.

    names: optional display names per slot (behavior, product type, brand values) for `describe`.
    """

    def __init__(self, slot_sizes: dict, names: dict | None = None):
        self.slot_sizes = dict(slot_sizes)
        self.names = {k: list(v) for k, v in (names or {}).items()}
        self.offsets = {}
        total = 0
        for slot, size in self.slot_sizes.items():
            if size < 1:
                raise ValueError(f"vocabulary slot {slot!r} must hold at least one token, got {size}")
            self.offsets[slot] = total
            total += size
        self.size = total

    def __len__(self):
        return self.size

    def __eq__(self, other):
        return isinstance(other, Vocabulary) and (self.slot_sizes, self.names) == (other.slot_sizes, other.names)

    def slot_range(self, slot: str) -> range:
        return range(self.offsets[slot], self.offsets[slot] + self.slot_sizes[slot])

    def token(self, slot: str, index):
        """Token id(s) of `index` (int, numpy array or tensor) in `slot`; checks the range."""
        size, values = self.slot_sizes[slot], torch.as_tensor(index)
        if values.numel() and (int(values.min()) < 0 or int(values.max()) >= size):
            raise ValueError(f"index out of range for vocabulary slot {slot!r} (size {size}): "
                             f"[{int(values.min())}, {int(values.max())}]")
        return index + self.offsets[slot]

    def slot_of(self, token: int) -> tuple:
        """(slot, index inside the slot) of one token id."""
        for slot, offset in self.offsets.items():
            if offset <= token < offset + self.slot_sizes[slot]:
                return slot, token - offset
        raise ValueError(f"token {token} is outside the vocabulary (size {self.size})")

    def describe(self, tokens) -> list:
        """Readable names, e.g. ['behavior:buy', 'product_type:UNK', 'sid_1:17', 'collision:0']."""
        out = []
        for token in torch.as_tensor(tokens).reshape(-1).tolist():
            slot, index = self.slot_of(token)
            if slot == "special":
                out.append(SPECIAL_TOKENS[index])
            elif slot in COT_SLOTS and index == UNK:
                out.append(f"{slot}:UNK")
            elif slot in self.names:
                out.append(f"{slot}:{self.names[slot][index - (slot in COT_SLOTS)]}")
            else:
                out.append(f"{slot}:{index - (slot in COT_SLOTS)}")
        return out

    def state_dict(self) -> dict:
        return {"slot_sizes": self.slot_sizes, "names": self.names}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Vocabulary":
        return cls(state["slot_sizes"], state["names"])
