"""The error of the dev cluster's API emulator: a Kubernetes ``Status`` failure with its HTTP code.

Raised by the storage (``emulator``), patching (``patching``) and HTTP (``http_api``) layers alike,
so it lives apart from all of them; ``emulator`` re-exports it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ApiError"]

Obj = dict[str, Any]


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str):
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def status(self) -> Obj:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": self.message, "reason": self.reason, "code": self.code}
