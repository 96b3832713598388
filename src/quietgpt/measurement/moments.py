"""Streaming float64 moments and kurtosis: the one definition of kurtosis every metric uses.

Kurtosis is Pearson's, mu4 / sigma^4 (3 for a normal distribution), with the population (biased)
moments, computed in float64; `excess_kurtosis` = kurtosis - 3 (scipy's default "fisher" form).
Undefined values (a constant tensor) are None, never NaN.
"""

from __future__ import annotations

import numpy as np
import torch

Tensor = torch.Tensor


class Moments:
    """Streaming float64 count, mean and central moment sums M2..M4 of everything passed to `update`.

    Chunks are merged with the pairwise formulas of Pébay (2008), which are exact in exact arithmetic
    and stable in floating point, so memory is O(1) however many values stream through, and the result
    equals the one-shot computation over the concatenation up to rounding.
    """

    __slots__ = ("m2", "m3", "m4", "mean", "n")

    def __init__(self) -> None:
        self.n, self.mean, self.m2, self.m3, self.m4 = 0, 0.0, 0.0, 0.0, 0.0

    def update(self, x: Tensor | np.ndarray) -> Moments:
        """Fold in all values of x (any shape): the chunk's own central moments in float64, then a merge."""
        a = torch.as_tensor(x).detach().reshape(-1).to(torch.float64, copy=True)
        if a.numel() == 0:
            return self
        mean = float(a.mean())
        d = a.sub_(mean)
        d2 = d * d
        other = Moments()
        other.n, other.mean = a.numel(), mean
        # dot products: fused multiply-sums without temporaries
        other.m2, other.m3, other.m4 = float(d2.sum()), float(torch.dot(d2, d)), float(torch.dot(d2, d2))
        return self.merge(other)

    def update_power_sums(self, n: int, x: Tensor) -> Moments:
        """Fold in n values whose nonzero ones are all in x (x may hold extra exact zeros, e.g. masked
        attention weights, that are not counted). Uses float64 raw power sums, which is accurate when
        |mean| is not much larger than the spread (true for probabilities in [0, 1])."""
        a = x.detach().reshape(-1).to(torch.float64)
        if n == 0:
            return self
        a2 = a * a
        s1, s2, s3, s4 = float(a.sum()), float(a2.sum()), float(torch.dot(a2, a)), float(torch.dot(a2, a2))
        mu = s1 / n
        other = Moments()
        other.n, other.mean = n, mu
        other.m2 = max(s2 - n * mu * mu, 0.0)
        other.m3 = s3 - 3 * mu * s2 + 2 * n * mu**3
        other.m4 = s4 - 4 * mu * s3 + 6 * mu * mu * s2 - 3 * n * mu**4
        return self.merge(other)

    def merge(self, o: Moments) -> Moments:
        """Fold o's values into self (in place) and return self."""
        if o.n == 0:
            return self
        if self.n == 0:
            self.n, self.mean, self.m2, self.m3, self.m4 = o.n, o.mean, o.m2, o.m3, o.m4
            return self
        na, nb = self.n, o.n
        n = na + nb
        delta = o.mean - self.mean
        d_n = delta / n
        m4 = (self.m4 + o.m4 + delta * d_n**3 * na * nb * (na * na - na * nb + nb * nb)
              + 6.0 * d_n * d_n * (na * na * o.m2 + nb * nb * self.m2) + 4.0 * d_n * (na * o.m3 - nb * self.m3))
        m3 = self.m3 + o.m3 + delta * d_n * d_n * na * nb * (na - nb) + 3.0 * d_n * (na * o.m2 - nb * self.m2)
        m2 = self.m2 + o.m2 + delta * d_n * na * nb
        self.n, self.mean, self.m2, self.m3, self.m4 = n, self.mean + d_n * nb, m2, m3, m4
        return self

    @property
    def var(self) -> float | None:
        """Population variance (divide by n)."""
        return self.m2 / self.n if self.n else None

    def kurtosis(self, fisher: bool = False) -> float | None:
        """Pearson's n M4 / M2^2 (minus 3 when fisher); None for fewer than 2 values or zero variance."""
        if self.n < 2 or not self.m2 > 0.0:
            return None
        k = self.n * self.m4 / (self.m2 * self.m2)
        return k - 3.0 if fisher else k


def kurtosis(x: Tensor | np.ndarray, fisher: bool = False) -> float | None:
    """Kurtosis of all values of x in float64; Pearson's (normal = 3) unless fisher (normal = 0).
    Equals scipy.stats.kurtosis(x.ravel(), fisher=fisher, bias=True); None where that is NaN."""
    return Moments().update(x).kurtosis(fisher)
