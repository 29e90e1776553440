"""The data order of the fine-tuning stages: indices 0..n-1 in a seeded shuffle, reshuffled each
epoch, drawn k at a time across epoch boundaries. Its state (epoch, position) is what a checkpoint
carries, so a resumed SFT, DPO, reward or GRPO run draws the same rows as one never stopped.
Under DDP every rank draws the same global batch and keeps its own slice (`rank_slice`)."""

from __future__ import annotations

import torch


class EpochOrder:
    """Example: EpochOrder(3, seed=0).take(5) is one permutation of [0, 1, 2], then the first two
    of the next epoch's permutation."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed = n, seed
        self.epoch, self.position = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def take(self, k: int) -> list[int]:
        picked = []
        while len(picked) < k:
            if self.position >= len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation()
            picked.append(self._order[self.position])
            self.position += 1
        return picked

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation()


def rank_slice(items: list, rank: int, per_rank: int) -> list:
    """This rank's share of a global batch: items [rank*per_rank, (rank+1)*per_rank)."""
    return items[rank * per_rank:(rank + 1) * per_rank]
