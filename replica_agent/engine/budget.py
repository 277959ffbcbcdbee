"""The token bucket between the batch mixer's decisions and the trainer thread.

After every inference iteration the engine credits what the mixer allowed; the trainer takes a
whole step's tokens before it runs the step. The balance is capped so that credit earned while
idle cannot be spent in a burst after load returns.
"""

from __future__ import annotations

import threading


class TrainingBudget:
    def __init__(self, max_balance: int, *, unlimited: bool = False) -> None:
        self.max_balance = max_balance
        self.unlimited = unlimited
        self._balance = 0
        self._cv = threading.Condition()
        self._closed = False
        self.granted_tokens = 0

    @property
    def balance(self) -> int:
        with self._cv:
            return self._balance

    def credit(self, tokens: int) -> None:
        if tokens <= 0:
            return
        with self._cv:
            self._balance = min(self.max_balance, self._balance + tokens)
            self._cv.notify_all()

    def acquire(self, tokens: int, timeout: float | None = None) -> bool:
        """Wait until `tokens` are available and take them; False on timeout or close."""
        with self._cv:
            if self.unlimited:
                self.granted_tokens += tokens
                return not self._closed
            need = min(tokens, self.max_balance)  # a step larger than the cap waits for a full bucket
            ok = self._cv.wait_for(lambda: self._closed or self._balance >= need, timeout)
            if not ok or self._closed:
                return False
            self._balance -= need
            self.granted_tokens += tokens
            return True

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
