"""A linear-chain CRF over token positions: negative log-likelihood, posterior marginals (for
cross-view alignment) and Viterbi decoding, batched, with a prefix mask per sequence.

Written here because the maintained CRF packages stop at the likelihood and Viterbi: CVA needs the
posterior marginals, computed by the forward-backward algorithm.
"""

from __future__ import annotations

import torch
from torch import nn


class CRF(nn.Module):
    """Transition scores between `num_labels` labels, plus start and end scores."""

    def __init__(self, num_labels: int):
        super().__init__()
        self.transitions = nn.Parameter(torch.zeros(num_labels, num_labels))  # [from, to]
        self.start = nn.Parameter(torch.zeros(num_labels))
        self.end = nn.Parameter(torch.zeros(num_labels))

    def _potentials(self, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.transitions / temperature, self.start / temperature, self.end / temperature

    def _forward(self, emissions: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """alpha[b, t, y]: log-sum of the scores of every prefix ending in y at t (masked steps
        carry the previous alpha)."""
        trans, start, _ = self._potentials(temperature)
        alphas = [start + emissions[:, 0]]
        for t in range(1, emissions.shape[1]):
            step = torch.logsumexp(alphas[-1].unsqueeze(2) + trans.unsqueeze(0), dim=1) + emissions[:, t]
            alphas.append(torch.where(mask[:, t:t + 1], step, alphas[-1]))
        return torch.stack(alphas, dim=1)

    def _backward(self, emissions: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """beta[b, t, y]: log-sum of the scores of every suffix after y at t (end scores included)."""
        trans, _, end = self._potentials(temperature)
        length = emissions.shape[1]
        betas = [end.expand(emissions.shape[0], -1)]
        for t in range(length - 2, -1, -1):
            nxt = betas[-1]
            step = torch.logsumexp(trans.unsqueeze(0) + (emissions[:, t + 1] + nxt).unsqueeze(1), dim=2)
            betas.append(torch.where(mask[:, t + 1:t + 2], step, nxt))
        return torch.stack(betas[::-1], dim=1)

    def log_partition(self, emissions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        _, _, end = self._potentials(1.0)
        return torch.logsumexp(self._forward(emissions, mask)[:, -1] + end, dim=1)

    def path_score(self, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Score of the tag path `tags` [B, T] over the unmasked prefix."""
        m = mask.to(emissions.dtype)
        emit = emissions.gather(2, tags.unsqueeze(2)).squeeze(2)
        score = self.start[tags[:, 0]] + (emit * m).sum(1)
        score = score + (self.transitions[tags[:, :-1], tags[:, 1:]] * m[:, 1:]).sum(1)
        last = tags.gather(1, (mask.long().sum(1) - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        return score + self.end[last]

    def nll(self, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood per sequence [B]. Every sequence needs mask[:, 0] true."""
        return self.log_partition(emissions, mask) - self.path_score(emissions, tags, mask)

    def marginals(self, emissions: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Posterior label marginals [B, T, L] of the CRF with every score divided by
        `temperature` (rows of masked positions are meaningless; callers mask them)."""
        emissions = emissions / temperature
        alpha = self._forward(emissions, mask, temperature)
        beta = self._backward(emissions, mask, temperature)
        _, _, end = self._potentials(temperature)
        log_z = torch.logsumexp(alpha[:, -1] + end, dim=1)
        return torch.exp(alpha + beta - log_z[:, None, None])

    @torch.no_grad()
    def decode(self, emissions: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
        """The best label path of each sequence (Viterbi), cut to its unmasked length."""
        score = self.start + emissions[:, 0]
        back = []
        for t in range(1, emissions.shape[1]):
            total = score.unsqueeze(2) + self.transitions.unsqueeze(0)
            best, idx = total.max(dim=1)
            step = best + emissions[:, t]
            keep = mask[:, t:t + 1]
            score = torch.where(keep, step, score)
            back.append(torch.where(keep, idx, torch.arange(idx.shape[1], device=idx.device).expand_as(idx)))
        score = score + self.end
        lengths = mask.long().sum(1).tolist()
        last = score.argmax(1).tolist()
        paths = []
        for b, n in enumerate(lengths):
            path = [last[b]]
            for t in range(len(back) - 1, -1, -1):
                path.append(int(back[t][b, path[-1]]))
            path.reverse()
            paths.append(path[:n])
        return paths


def kl_divergence(teacher: torch.Tensor, student: torch.Tensor, mask: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Sum over unmasked positions of KL(teacher || student) between marginal rows, per sequence [B]."""
    kl = (teacher * (torch.log(teacher + eps) - torch.log(student + eps))).sum(-1)
    return (kl * mask.to(kl.dtype)).sum(1)
