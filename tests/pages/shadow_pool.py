"""A plain-Python stand-in for the device page pool, driven by `StepMetadata` arrays.

It applies a step the way the device must: every copy op first (from the pool as it was before the
step), then each real token's write at its `slot_mapping` slot. Reads follow a page table.
"""

from __future__ import annotations

from collections.abc import Sequence

from jaxkv.pages import StepMetadata


class ShadowPool:
    """`pages[page][offset]`: the token id whose KV the device holds there (None: unwritten)."""

    def __init__(self, num_pages: int, page_size: int) -> None:
        self.page_size = page_size
        self.pages: list[list[int | None]] = [[None] * page_size for _ in range(num_pages)]

    def apply(self, step: StepMetadata) -> None:
        """Apply `step`; an AssertionError if it copies into one page twice or writes one slot
        twice (the device would keep one of the two, silently)."""
        before = [list(page) for page in self.pages]
        copies = step.copy_ops[: step.num_copies].tolist()
        assert len({dst for _, dst in copies}) == len(copies), (
            f"copies into one page twice: {copies}"
        )
        for src, dst in copies:
            self.pages[dst] = list(before[src])
        slots = step.slot_mapping[: step.num_tokens].tolist()
        assert len(set(slots)) == len(slots), f"a step writes one slot twice: {slots}"
        tokens = step.token_ids[: step.num_tokens].tolist()
        for slot, token in zip(slots, tokens, strict=True):
            page, offset = divmod(slot, self.page_size)
            self.pages[page][offset] = token

    def read(self, page_ids: Sequence[int], length: int, start: int = 0) -> list[int | None]:
        """The token ids at positions `start .. length - 1` of a sequence with this page table
        (an AssertionError if one of them has no page: -1 would read the last page)."""
        tokens = []
        for position in range(start, length):
            page = page_ids[position // self.page_size]
            assert page >= 0, f"position {position} has no page in {list(page_ids)}"
            tokens.append(self.pages[page][position % self.page_size])
        return tokens
